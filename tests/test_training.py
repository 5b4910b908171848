import json

import pytest
import torch
from helpers import DEVICES, MODEL_KINDS, build_kind
from typer.testing import CliRunner

from sharetune.cli import app
from sharetune.data import load
from sharetune.models.arbnet import ArbNetMLP
from sharetune.recipes import Recipe
from sharetune.trainables import load_exported, load_preprocessing
from sharetune.training import TrainingState, train_epochs


@pytest.mark.parametrize("device", DEVICES)
def test_arbnet_learns_mnist1d_well_above_chance(device):
    data = load("mnist1d")
    model = ArbNetMLP(40, [200, 200], 10, hash="dirichlet", alpha=1.0, table_size=4000)
    results = list(train_epochs(model, data, Recipe(epochs=8, lr=0.05), device=device))
    assert len(results) == 8
    assert results[-1].test_accuracy > 0.35  # chance is 0.10
    assert results[-1].train_accuracy > results[0].train_accuracy


def test_learning_rate_drops_tenfold_after_four_epochs_without_better_train_accuracy():
    torch.manual_seed(0)
    data = load("synthetic", val_fraction=0)
    model = ArbNetMLP(64, [16], 4, hash="uniform", table_size=50)
    results = list(train_epochs(model, data, Recipe(epochs=30, lr=1e-5), device="cpu"))  # too small to learn
    best, flat, lr = -1.0, 0, 1e-5
    for r in results:
        assert r.lr == pytest.approx(lr)  # the rate the epoch trained at: a drop shows from the next epoch
        if r.train_accuracy > best * (1 + 1e-4):  # ReduceLROnPlateau's default relative threshold
            best, flat = r.train_accuracy, 0
        else:
            flat += 1
        if flat == 4:
            lr, flat = lr / 10, 0
    assert results[-1].lr < 1e-5


def test_an_epochs_lr_is_the_rate_its_last_update_used_down_to_one_cycles_end():
    """Past its last step one-cycle's cosine mirrors back up: a 4-epoch run of 2 steps an epoch reported
    its last two epochs at the same rate (a walk)."""
    data = load("synthetic", val_fraction=0)
    recipe = Recipe(recipe="spin", epochs=4, batch_size=256, mixup=0, cutmix=0)  # 2 steps an epoch
    model = ArbNetMLP(64, [16], 4, hash="uniform", table_size=50)
    state = TrainingState.for_data(model, recipe, data)
    rates = [r.lr for r in train_epochs(model, data, recipe, device="cpu", state=state)]
    reference = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([torch.zeros(1)], lr=1), max_lr=recipe.scaled_lr,
                                                    total_steps=8, cycle_momentum=False)
    used = []
    for _ in range(8):  # each step's rate, as PyTorch's scheduler gives it
        used.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert data.steps_per_epoch(256) == 2 and rates == pytest.approx(used[1::2])
    assert rates[-1] == pytest.approx(recipe.scaled_lr / 25 / 1e4)  # one-cycle's floor: initial / final_div_factor


def test_diverging_run_stops_and_says_so():
    data = load("synthetic")
    model = ArbNetMLP(64, [16], 4, hash="uniform", table_size=50)
    results = list(train_epochs(model, data, Recipe(epochs=5, lr=1e30), device="cpu"))
    assert results[-1].diverged and len(results) < 5
    assert not any(r.diverged for r in results[:-1])


def test_cli_train_prints_json_metrics():
    result = CliRunner().invoke(app, ["train", "arbnet", "--dataset", "synthetic", "--hash", "neighborhood", "--radius", "3", "--table-size", "64", "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert {"test_accuracy", "train_accuracy", "loss", "unique_params", "virtual_params", "macs", "entropy", "diverged", "epoch_seconds"} <= set(metrics)
    assert metrics["epoch"] == 2 and metrics["unique_params"] < metrics["virtual_params"]


def test_timms_optimizer_and_ema_see_a_shared_spin_tensor_once():
    from sharetune.models import create_model
    from sharetune.training import TrainingState

    torch.manual_seed(0)
    model = create_model("convmixer", dim=8, depth=4, patch_size=2, kernel_size=3, num_classes=4, in_chans=1, sharing={"share_rate": 2})
    state = TrainingState(model, Recipe(recipe="spin", ema_decay=0.5, mixup=0, cutmix=0), steps_per_epoch=4, num_classes=4)
    unique = list(model.parameters())
    in_optimizer = [p for group in state.optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len({id(p) for p in in_optimizer}) == len(unique)
    bank = model.spin_bank.get_parameter("1_weight__0")
    decays = {id(p): group["weight_decay"] for group in state.optimizer.param_groups for p in group["params"]}
    assert decays[id(bank)] == 2e-5 and decays[id(model.stem[2].weight)] == 0.0  # no decay on norms
    ema_bank = state.ema.module.spin_bank.get_parameter("1_weight__0")
    assert len(list(state.ema.module.parameters())) == len(unique)
    for step in range(2):  # timm's EMA copies the model at its first update, then averages
        loss, _ = state.loss(model, torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))
        state.step(model, loss)
        if step == 0:
            torch.testing.assert_close(ema_bank, bank.detach())
            before = bank.detach().clone()
    torch.testing.assert_close(ema_bank, 0.5 * before + 0.5 * bank.detach())  # averaged once, not twice
    aliased = model.blocks[1][1].weight  # the second layer of entry 0 reads the bank's tensor
    assert aliased is bank and state.ema.module.blocks[1][1].weight is ema_bank


@pytest.mark.parametrize("kind", [kind for kind in MODEL_KINDS if not kind.startswith("arbnet")])
def test_the_recipe_decays_no_bias_norm_scale_or_token_shared_fused_or_not(kind):
    from sharetune.training import decay_groups

    _, model = build_kind(kind, load("synthetic"))
    decayed = {id(p) for p in decay_groups(model, 0.1)[0]["params"]}
    names = [name for name, p in model.named_parameters() if id(p) in decayed]
    # every bias and norm scale is a vector; the vectors left are a fusion's mixing weights and a transform's shift
    vectors = [name for name, p in model.named_parameters() if id(p) in decayed and p.ndim < 2]
    assert all(name.endswith((".alpha", ".shift")) for name in vectors), vectors
    assert not [name for name in names if name.endswith(("pos_embed", "cls_token"))]  # DeiT's, as timm declares


def test_cli_trains_one_spin_model_as_a_trial_would_and_writes_it_as_export_does(tmp_path):
    args = ["train", "spin", "--dataset", "synthetic", "--dim", "16", "--depth", "4", "--patch-size", "2", "--kernel-size", "3",
            "--share-rate", "2", "--epochs", "2", "--json", "--out", str(tmp_path / "model.pt")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)  # the model's line goes to stderr: stdout stays JSON
    assert metrics["epoch"] == 2 and metrics["effective_share_rate"] == pytest.approx(2164 / 1652)  # as in the search test
    # the file holds the model evaluation measured (the spin recipe's EMA), deployed: it scores the test accuracy printed
    model, test = load_exported(tmp_path / "model.pt"), load("synthetic")
    with torch.no_grad():
        assert (model(test.x_test).argmax(1) == test.y_test).float().mean().item() == pytest.approx(metrics["test_accuracy"])
    assert load_preprocessing(tmp_path / "model.pt") == test.preprocessing
    bad = CliRunner().invoke(app, ["train", "spin", "--dataset", "synthetic", "--mapping", "diagonal"])
    assert bad.exit_code == 2 and "mapping: allowed: 'sequential', 'strided', 'pyramid', 'random' or 'cka', got 'diagonal'" in bad.output


def test_an_arbnet_keeps_an_ema_of_its_tables_and_batchnorm_statistics():
    """An ArbNet layer's state holds its hash recipe (not a tensor) and an integer index: the EMA averages
    the floating-point tensors and leaves those alone (timm's own update failed on the recipe)."""
    from sharetune.models import ArbNetMLP
    from sharetune.training import TrainingState

    torch.manual_seed(0)
    model = ArbNetMLP(64, [16], 4, hash="dirichlet", alpha=1.0, table_size=50)
    state = TrainingState(model, Recipe(ema_decay=0.5), steps_per_epoch=4, num_classes=4)
    table, statistics = model.layers[0].table, model.layers[2].running_mean
    for step in range(2):
        loss, _ = state.loss(model, torch.randn(8, 64), torch.randint(0, 4, (8,)))
        state.step(model, loss)
        if step == 0:
            before = table.detach().clone(), statistics.clone()
    ema = state.ema.module
    torch.testing.assert_close(ema.layers[0].table, 0.5 * before[0] + 0.5 * table.detach())
    torch.testing.assert_close(ema.layers[2].running_mean, 0.5 * before[1] + 0.5 * statistics)
    assert torch.equal(ema.layers[0].index, model.layers[0].index)


EVERY_PIECE = {"ema_decay": 0.9, "mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1, "grad_clip": 1.0, "random_erasing": 0.5,
               "schedule": "cosine", "warmup_epochs": 1, "precision": "bf16", "channels_last": True}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_model_kind_trains_with_every_recipe_piece_on(kind):
    """The pieces combine with every model (an EMA of an ArbNet failed at its first step, once)."""
    data = load("synthetic", train_subset=64, test_subset=32)
    settings, model = build_kind(kind, data, recipe="spin", epochs=2, batch_size=16, **EVERY_PIECE)
    results = list(train_epochs(model, data, settings, device="cpu"))
    assert [r.epoch for r in results] == [1, 2] and not results[-1].diverged


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_run_repeats_from_its_seed_and_a_resumed_one_goes_on_as_if_never_stopped(kind):
    """MixUp and CutMix draw from NumPy, erasing from Python's generator, dropout from torch's: each
    epoch seeds them all from the seed and the epoch."""
    import io

    from sharetune.training import TrainingState

    data = load("synthetic", train_subset=64, test_subset=32)
    changes = {"recipe": "spin", "epochs": 3, "batch_size": 16, "ema_decay": 0.5, "random_erasing": 0.5}
    settings, straight = build_kind(kind, data, **changes)
    straight_state = TrainingState.for_data(straight, settings, data)
    whole = [r.loss for r in train_epochs(straight, data, settings, device="cpu", state=straight_state)]
    settings, model = build_kind(kind, data, **changes)
    state = TrainingState.for_data(model, settings, data)
    first = next(train_epochs(model, data, settings, device="cpu", state=state)).loss
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "training": state.state_dict()}, saved)  # as a trial checkpoints
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    settings, model = build_kind(kind, data, **changes)
    model.load_state_dict(checkpoint["model"])
    state = TrainingState.for_data(model, settings, data)
    state.load_state_dict(checkpoint["training"])
    rest = [r.loss for r in train_epochs(model, data, settings, device="cpu", state=state, start_epoch=1)]
    assert [first, *rest] == pytest.approx(whole, rel=1e-6)
    # and so are the weights it is evaluated with (the EMA's, whose warm-up counts the updates)
    assert state.updates == straight_state.updates
    weights = [{k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)} for m in (state.evaluated(model), straight_state.evaluated(straight))]
    torch.testing.assert_close(*weights, rtol=1e-5, atol=1e-6)
