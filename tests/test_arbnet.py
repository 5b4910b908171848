import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES
from torch import nn

from sharetune.models import arbnet, hashes, table_ops
from sharetune.models.arbnet import ArbLinear, ArbNetMLP, conv2d_as_arbnet
from sharetune.models.native import table_kernels
from sharetune.models.table_ops import KERNEL_ENV, KERNELS

CUDA = DEVICES[1]  # skipped where no GPU is present
# table gradients compared across devices: CUDA's matmuls sum in another order than CPU's
GRAD_ATOL = {"cpu": 1e-5, "cuda": 1e-4}


@pytest.fixture(params=[*KERNELS, "native-scalar", "native-parts", CUDA])
def kernel(request, monkeypatch):
    """Every CPU kernel; `native` gathers from small tables with vector gathers, `native-scalar` with
    scalar loads, `native-parts` sends even these small tables through the large-table layout; `cuda`
    (where a GPU is present) runs the test's layers on the GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # references in full float32
    monkeypatch.setattr(table_ops, "vector_gathers_pay", lambda: request.param != "native-scalar")
    if request.param == "native-parts":
        monkeypatch.setattr(table_ops, "SMALL_TABLE", 0)
    monkeypatch.setenv(KERNEL_ENV, request.param.partition("-")[0].replace("cuda", "auto"))
    return request.param


@pytest.fixture
def device(kernel) -> str:
    return "cuda" if kernel == "cuda" else "cpu"


def plain_weights(layers) -> list[torch.Tensor]:
    """Reference weights: each layer's table read by plain indexing, through none of our kernels."""
    return [
        (torch.cat([l.table, l.table.new_zeros(1)])[l.index.long()] * (1 if l.sign is None else l.sign)).view(l.out_features, l.in_features)
        for l in layers
    ]


@pytest.fixture
def plain_reference(monkeypatch):
    """After this is called, ArbNetMLPs gather through `plain_weights`: a reference to compare with."""
    return lambda: monkeypatch.setattr(arbnet, "gather_weights", plain_weights)


@pytest.mark.parametrize("options", [dict(hash="uniform"), dict(hash="hashednets", sign=True), dict(hash="dirichlet", alpha=0.3, sparsity=0.25)])
@pytest.mark.parametrize("shape", [(37, 23, 50), (800, 700, 30_000)], ids=["small", "large"])
def test_table_gradient_is_the_per_bucket_sum_of_the_dense_gradient(device, options, shape):
    torch.manual_seed(0)
    in_features, out_features, table_size = shape
    layer = ArbLinear(in_features, out_features, table_size=table_size, **options).to(device)
    x = torch.randn(8, in_features, device=device)
    weight = layer.dense_weight()
    weight.retain_grad()
    F.linear(x, weight, layer.bias).square().sum().backward()
    signs = torch.ones(layer.index.numel(), device=device) if layer.sign is None else layer.sign.float()
    expected = torch.zeros(layer.table_size + 1, dtype=torch.float64, device=device)
    expected.index_add_(0, layer.index.long(), (weight.grad.flatten() * signs).double())
    torch.testing.assert_close(layer.table.grad.double(), expected[:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_table_gradient_with_weights_far_apart(device, signed):
    """Weights that read the table thousands of positions apart (the rest read the zero slot): the
    large-table scatter steps over such gaps in several moves, the longest one at a time."""
    longest = (1 << (32 - table_ops.LOCAL_BITS)) - 1
    steps = [1, longest, longest + 1, 2 * longest, 2 * longest + 1, 50_000]
    positions = np.cumsum([0, *steps])
    table_size = 30_000
    index = np.full(100 * 1000, table_size)
    index[positions] = [0, 29_999, 0, 15_000, 29_999, 7, 15_001]
    sign = np.where(np.arange(index.size) % 3 == 0, -1, 1).astype(np.int8) if signed else None
    layer = ArbLinear.from_index(index.reshape(100, 1000), table_size, sign=sign).to(device)
    grad = torch.randn(100, 1000, device=device)
    (layer.dense_weight() * grad).sum().backward()
    expected = torch.zeros(table_size + 1, dtype=torch.float64, device=device)
    signs = 1 if layer.sign is None else layer.sign.double()
    expected.index_add_(0, layer.index.long(), grad.flatten().double() * signs)
    torch.testing.assert_close(layer.table.grad.double(), expected[:-1], rtol=1e-6, atol=1e-6)


def test_dense_weight_reads_the_table(device):
    layer = ArbLinear(5, 4, table_size=7, hash="uniform", seed=3).to(device)
    weight = layer.dense_weight().detach()
    assert torch.equal(weight.flatten(), layer.table.detach()[layer.index.long()])


def test_conv2d_as_arbnet_matches_conv2d(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1).to(device)
    layer = conv2d_as_arbnet(conv, (9, 9)).to(device)
    assert layer.table.numel() == conv.weight.numel()  # only the kernel is stored
    x = torch.randn(2, 3, 9, 9, device=device)
    torch.testing.assert_close(layer(x.flatten(1)), conv(x).flatten(1), rtol=1e-5, atol=1e-5)


def test_rnn_weight_reuse_is_a_modulus_hash_over_stacked_layers(device):
    torch.manual_seed(0)
    hidden, steps = 6, 4
    rnn = nn.RNN(hidden, hidden, bias=False, batch_first=True).to(device)
    # one ArbNet layer per unrolled step, all numbered sequentially: step t uses ids [t*H*H, (t+1)*H*H)
    stacked = ArbLinear(hidden, hidden * steps * 2, table_size=hidden * hidden * 2, hash="modulus").to(device)
    with torch.no_grad():
        stacked.table.copy_(torch.cat([rnn.weight_ih_l0.flatten(), rnn.weight_hh_l0.flatten()]))
    weights = stacked.dense_weight().view(steps * 2, hidden, hidden)
    x = torch.randn(3, steps, hidden, device=device)
    h = torch.zeros(3, hidden, device=device)
    for t in range(steps):
        h = torch.tanh(x[:, t] @ weights[2 * t].T + h @ weights[2 * t + 1].T)
    atol = 1e-5 if device == "cuda" else 1e-6  # cuDNN's RNN sums in another order than the loop's matmuls
    torch.testing.assert_close(h, rnn(x)[1][0], rtol=1e-5, atol=atol)


def test_sparsity_is_exact_and_never_trained(device):
    layer = ArbLinear(50, 40, table_size=100, hash="uniform", sparsity=0.3, seed=1).to(device)
    zeros = lambda: int((layer.dense_weight() == 0).sum())
    assert zeros() == round(0.3 * 2000) and int((layer.index == layer.table_size).sum()) == round(0.3 * 2000)  # the zero slot
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(16, 50, device=device)).square().mean().backward()
        opt.step()
    assert zeros() == 600


def test_state_dict_round_trips_exactly():
    layer = ArbLinear(30, 20, table_size=64, hash="dirichlet", alpha=0.5, sparsity=0.1, seed=5)
    assert layer.index.dtype == torch.int32
    other = ArbLinear(30, 20, table_size=64, hash="uniform", seed=99)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.index, layer.index) and torch.equal(other.dense_weight(), layer.dense_weight())
    other.load_state_dict(torch.load(io.BytesIO(saved(layer.state_dict())), weights_only=True))
    assert torch.equal(other.dense_weight(), layer.dense_weight())


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_checkpoint_holds_the_tables_and_the_index_is_rebuilt_at_load():
    model = ArbNetMLP.paper("mnist", hash="dirichlet", alpha=0.5, sparsity=0.2, table_size=1000, seed=3)
    x = torch.randn(8, 784)
    model(x).sum().backward()  # the native kernels' plans (packed 16-bit index) exist now: derived, not saved
    model.eval()
    state = model.state_dict()
    assert not [k for k in state if k.endswith(("index", "sign"))]
    data = saved(state)
    unique = sum(p.numel() for p in model.parameters())
    statistics = sum(b.numel() for m in model.modules() if isinstance(m, nn.BatchNorm1d) for b in m.buffers())
    assert len(data) <= 1.1 * 4 * (unique + statistics) + 8 * 1024  # + torch's zip format, about 6 KB here
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    for other in (ArbNetMLP.paper("mnist", hash="dirichlet", alpha=0.5, sparsity=0.2, table_size=1000, seed=3),
                  ArbNetMLP.paper("mnist", hash="uniform", table_size=1000, seed=9)):  # another recipe: rebuilt from the saved one
        other.load_state_dict(loaded)
        assert torch.equal(other.eval()(x), model(x))
        assert [torch.equal(a.index, b.index) for a, b in zip(other.arb_layers(), model.arb_layers())] == [True] * 3


def test_signs_are_rebuilt_too_and_layers_built_from_an_index_store_it():
    signed = ArbLinear(30, 20, table_size=64, hash="hashednets", sign=True, seed=2)
    plain = ArbLinear(30, 20, table_size=64, hash="hashednets", seed=7)
    plain.load_state_dict(torch.load(io.BytesIO(saved(signed.state_dict())), weights_only=True))
    assert torch.equal(plain.sign, signed.sign) and torch.equal(plain.dense_weight(), signed.dense_weight())
    custom = ArbLinear.from_index(np.arange(12).reshape(3, 4)[::-1] % 5, 5)
    assert "index" in custom.state_dict()
    other = ArbLinear.from_index(np.zeros((3, 4), dtype=int), 5)
    other.load_state_dict(torch.load(io.BytesIO(saved(custom.state_dict())), weights_only=True))
    assert torch.equal(other.dense_weight(), custom.dense_weight())


def test_a_user_hash_keeps_its_index_in_checkpoints_unless_it_declares_itself_deterministic():
    @hashes.register_hash("test_global_rng")
    def global_rng(shape, table_size, rng):  # draws from NumPy's global generator: not a function of the seed
        return hashes.Hashed(np.random.randint(0, table_size, int(np.prod(shape))))

    @hashes.register_hash("test_declared", deterministic=True)
    def declared(shape, table_size, rng):
        return hashes.Hashed(rng.integers(0, table_size, int(np.prod(shape))))

    try:
        layer = ArbLinear(30, 20, table_size=64, hash="test_global_rng")
        assert "index" in layer.state_dict()
        other = ArbLinear(30, 20, table_size=64, hash="test_global_rng")
        assert not torch.equal(other.index, layer.index)
        other.load_state_dict(torch.load(io.BytesIO(saved(layer.state_dict())), weights_only=True))
        assert torch.equal(other.dense_weight(), layer.dense_weight())
        assert "index" not in ArbLinear(30, 20, table_size=64, hash="test_declared").state_dict()
    finally:
        for name in ("test_global_rng", "test_declared"):
            hashes._HASHES.pop(name)


def test_entropy():
    balanced = ArbLinear(100, 100, table_size=1000, hash="modulus")
    assert round(balanced.entropy(), 2) == 6.91  # ln(1000): the paper's uniform 1000-entry table
    assert set(balanced.usage().tolist()) == {10}  # 10 000 weights, 10 to each entry
    skewed = ArbLinear(100, 100, table_size=1000, hash="dirichlet", alpha=0.05)
    assert skewed.entropy() < balanced.entropy()


def test_paper_mlps_and_compression():
    mnist = ArbNetMLP.paper("mnist", hash="dirichlet", alpha=1.0, table_size=1000)
    assert [(l.in_features, l.out_features, l.table_size) for l in mnist.arb_layers()] == [(784, 200, 1000), (200, 200, 1000), (200, 10, 1000)]
    assert mnist(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    cifar = ArbNetMLP.paper("cifar10", hash="uniform", compression=0.1)
    assert [l.table_size for l in cifar.arb_layers()] == [614400, 400000, 400000, 400000, 400000, 2000]
    mixed = ArbNetMLP(10, [8], 3, hash=["identity", "neighborhood"], radius=[None, 2], table_size=[None, 5])
    assert [l.table_size for l in mixed.arb_layers()] == [80, 5]
    with pytest.raises(ValueError, match="table_size/compression"):
        ArbNetMLP(10, [8], 3, hash="uniform")
    with pytest.raises(ValueError, match="hash: expected 2 values"):
        ArbNetMLP(10, [8], 3, hash=["uniform"], table_size=5)


def test_identity_arbnet_equals_dense_linear():
    layer = ArbLinear(6, 5, table_size=30, hash="identity")
    dense = nn.Linear(6, 5)
    with torch.no_grad():
        dense.weight.copy_(layer.table.view(5, 6))
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), dense(x))
    assert math.isclose(layer.entropy(), math.log(30))


def test_plan_follows_the_index_through_copies_loads_and_devices(device):
    import copy

    layer = ArbLinear(20, 30, table_size=40, hash="uniform", seed=1)
    x = torch.randn(2, 20)
    before = layer(x)  # builds a CPU plan
    layer.to(device)
    x = x.to(device)
    torch.testing.assert_close(layer(x), before.to(device))
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), before.to(device))
    other = ArbLinear(20, 30, table_size=40, hash="modulus").to(device)
    other(x)  # builds a plan for the modulus index
    other.load_state_dict(layer.state_dict())  # overwrites the index in place
    torch.testing.assert_close(other(x), before.to(device))
    torch.testing.assert_close(layer.cpu()(x.cpu()), before)


def test_float64_tables_fall_back_to_index_select(device):
    layer = ArbLinear(20, 30, table_size=40, hash="hashednets", sign=True, sparsity=0.2).double().to(device)
    weight = layer.dense_weight()
    assert weight.dtype == torch.float64
    torch.testing.assert_close(weight, plain_weights([layer])[0])


def test_mlp_gathers_its_layers_together_with_the_same_gradients(device, plain_reference):
    torch.manual_seed(0)
    options = dict(hash=["uniform", "hashednets", "dirichlet"], alpha=[None, None, 0.5], table_size=[50, 40, 30], sparsity=[0.1, 0.0, 0.2])
    model = ArbNetMLP(30, [20, 20], 5, **options).to(device)
    x = torch.randn(16, 30)
    model(x.to(device)).square().sum().backward()
    plain_reference()  # on CPU
    reference = ArbNetMLP(30, [20, 20], 5, **options)
    reference.load_state_dict(model.state_dict())
    reference(x).square().sum().backward()
    for layer, expected in zip(model.arb_layers(), reference.arb_layers()):
        torch.testing.assert_close(layer.table.grad.cpu(), expected.table.grad, rtol=1e-4, atol=GRAD_ATOL[device])


def test_layers_gathered_together_match_plain_indexing(device):
    torch.manual_seed(0)
    layers = [
        ArbLinear(30, 20, table_size=50, hash="hashednets", sign=True, sparsity=0.2, seed=1).to(device),
        ArbLinear(20, 20, table_size=40, hash="uniform", seed=2).to(device),
        ArbLinear(20, 5, table_size=30, hash="dirichlet", alpha=0.5, sparsity=0.1, seed=3).to(device),
    ]
    probes = [torch.randn(layer.out_features, layer.in_features, device=device) for layer in layers]
    grads = []
    for gather in (arbnet.gather_weights, plain_weights):
        for layer in layers:
            layer.table.grad = None
        weights = gather(layers)
        sum((w * p).sum() for w, p in zip(weights, probes)).backward()
        grads.append(([w.detach() for w in weights], [layer.table.grad for layer in layers]))
    (weights, table_grads), (expected_weights, expected_grads) = grads
    for got, want in zip(weights + table_grads, expected_weights + expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_table_gradients_are_the_same_bit_for_bit_on_every_run(kernel):
    if kernel == "cuda":
        pytest.skip("CUDA's index_add_ sums with atomics, in an order that may change from run to run")
    torch.manual_seed(0)
    model = ArbNetMLP(784, [200], 10, hash="dirichlet", alpha=0.5, table_size=500)  # 156 800 weights: ten chunks
    x = torch.randn(32, 784)
    runs = []
    for _ in range(10):
        model.zero_grad()
        model(x).square().sum().backward()
        runs.append([layer.table.grad.clone() for layer in model.arb_layers()])
    assert all(torch.equal(got, want) for run in runs[1:] for got, want in zip(run, runs[0]))


def test_gathered_weights_are_never_overwritten_while_held_and_reuse_memory_once_free(kernel, device):
    layer = ArbLinear(30, 20, table_size=50, hash="uniform").to(device)
    held = layer.dense_weight().detach()  # shares the gathered memory
    snapshot = held.clone()
    with torch.no_grad():
        layer.table.add_(1.0)
    fresh = layer.dense_weight()
    assert torch.equal(held, snapshot) and torch.equal(fresh, snapshot + 1.0)
    if kernel in ("native", "native-scalar"):  # native gathers write into the last call's memory when nobody holds it
        address = fresh.data_ptr()
        del held, fresh
        assert layer.dense_weight().data_ptr() == address


def test_without_pytorchs_storage_use_count_every_gather_allocates(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")  # a private function: a later PyTorch may drop it
    monkeypatch.setenv(KERNEL_ENV, "native")
    layer = ArbLinear(30, 20, table_size=50, hash="uniform")
    # nothing holds the first weights, yet the second call cannot know it: it allocates (while the
    # first buffer is still referenced, so at another address)
    assert layer.dense_weight().data_ptr() != layer.dense_weight().data_ptr()


def test_two_forwards_before_one_backward_keep_their_own_weights(device, plain_reference):
    torch.manual_seed(0)
    model = ArbNetMLP(30, [20], 5, hash="uniform", table_size=40).to(device)
    x1, x2 = torch.randn(8, 30), torch.randn(8, 30)
    first = model(x1.to(device))
    with torch.no_grad():
        model.arb_layers()[-1].table.mul_(2.0)  # the second forward gathers other weights
    (first.square().sum() + model(x2.to(device)).square().sum()).backward()
    plain_reference()  # on CPU
    reference = ArbNetMLP(30, [20], 5, hash="uniform", table_size=40)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.arb_layers()[-1].table.div_(2.0)
    first = reference(x1)
    with torch.no_grad():
        reference.arb_layers()[-1].table.mul_(2.0)
    (first.square().sum() + reference(x2).square().sum()).backward()
    for layer, expected in zip(model.arb_layers(), reference.arb_layers()):
        torch.testing.assert_close(layer.table.grad.cpu(), expected.table.grad, rtol=1e-5, atol=GRAD_ATOL[device])


def test_a_failed_kernel_build_falls_back_to_pytorch_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARETUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    table_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the C.. table kernels failed"):
            assert table_kernels() is None
        layer = ArbLinear(20, 10, table_size=30, hash="uniform")
        assert layer.table_plan().kernel == "sparse"
        monkeypatch.setenv(KERNEL_ENV, "native")
        with pytest.raises(RuntimeError, match="SHARETUNE_TABLE_KERNEL=native needs a C.. compiler"):
            ArbLinear(20, 10, table_size=30, hash="uniform").table_plan()
    finally:
        table_kernels.cache_clear()
    assert not list(tmp_path.iterdir())  # no half-built library left behind
