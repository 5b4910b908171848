"""Mixed precision, channels-last and torch.compile in the training loop: on CPU here, on CUDA where present."""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import DEVICES, tiny_spec

from sharetune.data import load
from sharetune.models import create_model
from sharetune.models.arbnet import ArbNetMLP
from sharetune.recipes import Recipe
from sharetune.spaces import SpecError, parse_spec
from sharetune.training import EagerFallback, TrainingState, channels_last, resolve_precision, train_epochs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tiny_convnext(**sharing):
    torch.manual_seed(0)
    return create_model("convnext_isotropic", dim=8, depth=2, patch_size=2, kernel_size=3, num_classes=4, in_chans=1, **sharing)


def output_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes the model's linear layers compute in, recorded by forward hooks."""
    seen: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or type(module).__name__ == "ArbLinear":
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


def test_the_default_precision_is_fp32_on_cpu_and_fp16_on_cpu_is_refused_naming_the_setting():
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA device .*allowed here: fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    model = ArbNetMLP(64, [16], 4, hash="uniform", table_size=50)
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA device"):
        next(train_epochs(model, load("synthetic"), Recipe(epochs=1, precision="fp16"), device="cpu"))
    with pytest.raises(SpecError, match=r"precision: fp16 needs GPUs, .*\(resources.gpu: 0\); allowed: fp32, bf16"):
        parse_spec(tiny_spec(fixed={"table_size": 64, "epochs": 1, "precision": "fp16"}))
    assert parse_spec(tiny_spec(fixed={"precision": "fp16"}, resources={"gpu": 0.5})).fixed["precision"] == "fp16"
    with pytest.raises(SpecError, match="precision"):
        parse_spec(tiny_spec(fixed={"precision": "fp8"}))


@pytest.mark.parametrize("bf16", [True, False])
def test_on_cuda_the_defaults_are_bf16_where_the_gpu_computes_in_it_and_channels_last_for_convolutions(bf16, monkeypatch):
    """The choices the CUDA defaults make, from what torch says of the device (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    cuda = torch.device("cuda")
    assert resolve_precision(None, cuda) == ("bf16" if bf16 else "fp32")
    assert resolve_precision("fp16", cuda) == "fp16"
    if not bf16:
        with pytest.raises(ValueError, match="precision: Tesla V100 has no bf16; allowed here: fp32, fp16"):
            resolve_precision("bf16", cuda)
    recipe = Recipe()
    assert channels_last(tiny_convnext(), recipe, cuda) and not channels_last(tiny_convnext(), recipe, torch.device("cpu"))
    assert not channels_last(ArbNetMLP(64, [16], 4, hash="uniform", table_size=50), recipe, cuda)  # no convolution
    assert not channels_last(tiny_convnext(), Recipe(channels_last=False), cuda)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_runs_the_forward_in_bf16_and_still_learns(device):
    data = load("synthetic")
    torch.manual_seed(0)
    model = ArbNetMLP(64, [32], 4, hash="uniform", table_size=256)
    dtypes = output_dtypes(model)
    results = list(train_epochs(model, data, Recipe(epochs=3, precision="bf16"), device=device))
    assert dtypes == {torch.bfloat16}
    assert results[-1].test_accuracy > 0.6 and results[-1].loss < results[0].loss  # chance: 0.25
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32


def test_fp32_runs_in_fp32_and_the_checkpoint_holds_a_scaler_state_that_loads_without_code():
    data = load("synthetic")
    model = ArbNetMLP(64, [16], 4, hash="uniform", table_size=50)
    dtypes = output_dtypes(model)
    state = TrainingState.for_data(model, Recipe(epochs=1), data)
    list(train_epochs(model, data, Recipe(epochs=1), device="cpu", state=state))
    assert dtypes == {torch.float32} and state.precision == "fp32" and not state.scaler.is_enabled()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "training": state.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # tensors and plain containers only
    assert "scaler" in loaded["training"]
    TrainingState.for_data(model, Recipe(epochs=1), data).load_state_dict(loaded["training"])


@CUDA
def test_fp16_on_cuda_scales_the_loss_and_the_scaler_resumes_from_the_checkpoint():
    data = load("synthetic")
    model = tiny_convnext().cuda()
    recipe = Recipe(recipe="spin", epochs=2, batch_size=32, precision="fp16", mixup=0, cutmix=0)
    state = TrainingState.for_data(model, recipe, data)
    results = list(train_epochs(model, data, recipe, device="cuda", state=state))
    assert state.scaler.is_enabled() and results[-1].test_accuracy > 0.5
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = TrainingState.for_data(model, recipe, data)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.scaler.get_scale() == state.scaler.get_scale()


def test_a_step_the_gradient_scaler_skips_moves_neither_the_schedule_nor_the_update_count():
    """fp16 needs CUDA; its scaler is PyTorch's on any device, so on a CPU one whose scale overflows every
    gradient stands in for it: each step is skipped and the scale halves."""
    data = load("synthetic")
    model = tiny_convnext()
    state = TrainingState.for_data(model, Recipe(recipe="spin", epochs=2, batch_size=64, mixup=0, cutmix=0), data)
    largest = torch.finfo(torch.float32).max
    state.scaler = torch.amp.GradScaler("cpu", init_scale=largest)  # the scaled loss is infinite
    before = [p.detach().clone() for p in model.parameters()], state.lr
    x, y = next(data.train_batches(0, 64, seed=0, device=torch.device("cpu")))
    for _ in range(2):
        state.step(model, state.loss(model, x, y)[0])
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))  # no update was made
    assert (state.updates, state.lr) == (0, before[1])  # the count the EMA's warm-up reads, and the one-cycle rate
    assert state.scaler.get_scale() == pytest.approx(largest / 4)


def test_channels_last_trains_a_convolutional_model_in_nhwc_with_the_same_results():
    data = load("synthetic")
    plain, nhwc = tiny_convnext(), tiny_convnext()
    layouts: dict[str, set] = {"plain": set(), "nhwc": set()}
    for name, model in (("plain", plain), ("nhwc", nhwc)):  # the stem's 8-channel output: NHWC or not
        model.stem.register_forward_hook(lambda _m, _i, out, name=name: layouts[name].add(
            (out.is_contiguous(), out.is_contiguous(memory_format=torch.channels_last))) and None)
    recipe = Recipe(epochs=2, batch_size=64)
    expected = list(train_epochs(plain, data, recipe.model_copy(update={"channels_last": False}), device="cpu"))
    got = list(train_epochs(nhwc, data, recipe.model_copy(update={"channels_last": True}), device="cpu"))
    assert layouts == {"plain": {(True, False)}, "nhwc": {(False, True)}}
    for a, b in zip(expected, got):
        assert b.loss == pytest.approx(a.loss, rel=1e-4) and b.test_accuracy == pytest.approx(a.test_accuracy, abs=0.01)


FAILED_COMPILE = """
import json, warnings
import torch
from test_precision import tiny_convnext
from sharetune.data import load
from sharetune.recipes import Recipe
from sharetune.training import train_epochs
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    results = list(train_epochs(tiny_convnext(), load("synthetic"), Recipe(epochs=2, batch_size=64, compile=True), device="cpu"))
print(json.dumps({"warnings": [str(w.message) for w in caught if "compile" in str(w.message)],
                  "results": [[r.loss, r.test_accuracy] for r in results]}))
"""


def test_a_model_that_fails_to_compile_warns_once_and_trains_eagerly_with_the_eager_results():
    env = {**os.environ, "CXX": "/nonexistent/c++", "PYTHONPATH": str(Path(__file__).parent)}  # no working compiler
    run = subprocess.run([sys.executable, "-c", FAILED_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    expected = list(train_epochs(tiny_convnext(), load("synthetic"), Recipe(epochs=2, batch_size=64), device="cpu"))
    assert len(printed["warnings"]) == 1 and printed["warnings"][0].startswith("compile: torch.compile failed")
    assert printed["warnings"][0].endswith("training eagerly")
    assert printed["results"] == [[r.loss, r.test_accuracy] for r in expected]


def test_a_compiled_model_trains_like_the_eager_one():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = load("synthetic")
    recipe = Recipe(epochs=1, batch_size=128)
    expected = next(train_epochs(tiny_convnext(), data, recipe, device="cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = next(train_epochs(tiny_convnext(), data, recipe.model_copy(update={"compile": True}), device="cpu"))
    assert not [w for w in caught if "compile:" in str(w.message)]
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model: it did not run eagerly
    assert got.loss == pytest.approx(expected.loss, rel=1e-3)


def test_a_backward_that_fails_to_compile_runs_its_step_again_eagerly_and_says_so_every_time():
    """Inductor compiles the backward graph lazily, in the first backward pass: a failure there (here a
    backward compiler that raises) reaches the training step, past the forward's fallback."""
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(graph, inputs):
        raise RuntimeError("no backward kernels here")

    data = load("synthetic")
    x, y = next(data.train_batches(0, 64, seed=0, device=torch.device("cpu")))
    updated = []
    for compiled in (False, True, True):  # the third: a second trial in the same worker process
        model = tiny_convnext()
        state = TrainingState(model, Recipe(epochs=1), steps_per_epoch=1, num_classes=4)
        forward = EagerFallback(model)
        forward.compiled = torch.compile(model, backend=aot_autograd(fw_compiler=lambda graph, inputs: graph,
                                                                    bw_compiler=no_backward)) if compiled else None
        with warnings.catch_warnings(record=True) as caught:
            forward.step(lambda state, model, forward: state.step(model, state.loss(forward, x, y)[0]), state, model, forward,
                         updates=lambda state=state: state.updates)
        said = [str(w.message) for w in caught if str(w.message).startswith("compile:")]
        assert said == (["compile: torch.compile failed (RuntimeError: no backward kernels here); training eagerly"] if compiled else [])
        updated.append([p.detach().clone() for p in model.parameters()])
    for params in updated[1:]:  # one update, the eager one's
        assert all(torch.equal(a, b) for a, b in zip(updated[0], params, strict=True))

    def update_then_fail(state, model, forward):  # an error after the update is no compiler's: never a second update
        state.step(model, state.loss(forward, x, y)[0])
        raise RuntimeError("after the update")

    forward, made = EagerFallback(model), state.updates
    with pytest.raises(RuntimeError, match="after the update"), warnings.catch_warnings(record=True) as caught:
        forward.step(update_then_fail, state, model, forward, updates=lambda: state.updates)
    assert state.updates == made + 1 and forward.compiled is not None and not caught
