"""Property: whatever a spec holds, validation answers with an accepted spec or one line, never a
traceback; and what it accepts trains. Hypothesis mutates valid tiny specs with hostile values (huge,
negative, infinite, NaN, quoted, nested, integer-keyed) and `--set` strings that need not be YAML."""

import copy
import math

import pytest
import torch
from helpers import tiny_spec
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sharetune.data import DataError, load
from sharetune.spaces import FAMILIES, SearchSpec, SpecError, parse_spec, rehearse_sampler
from sharetune.spaces.spec import KINDS, apply_overrides
from sharetune.trainables import build_model, check_model, costs_of
from sharetune.training import train_epochs

EXAMPLES = 1000
TRAINED = 50  # accepted specs that must also build and train a batch

SPIN = {"name": "spin", "family": "spin", "data": {"name": "synthetic", "val_fraction": 0.1},
        "fixed": {"dim": 8, "depth": 4, "patch_size": 2, "kernel_size": 3, "batch_size": 32, "epochs": 2},
        "dimensions": {"share_rate": {"choice": [1, 2]}, "mapping": {"choice": ["sequential", "strided"]}},
        "objectives": {"val_accuracy": "max", "unique_params": "min"}, "sampler": "nsga2",
        "sampler_options": {"population_size": 4}, "budget": {"num_samples": 4}}
BASES = [
    tiny_spec(),
    tiny_spec(sampler="random", dimensions={"sparsity": {"uniform": [0.0, 0.5]}, "table_size": {"int": [8, 64], "step": 8}}),
    tiny_spec(sampler="grid", dimensions={"hash": {"choice": ["uniform", "modulus"]}}, fixed={"table_size": 32, "hidden": [8, 8]}),
    SPIN,
    {**SPIN, "dimensions": {"variant": {"choice": ["small", "deep"]}},
     "variants": {"small": {"dim": 8}, "deep": {"depth": 6, "share_rate": 3}}},
]
SETTINGS = sorted({name for family in FAMILIES.values() for name in family.model_fields})
PATHS = [
    "name", "family", "seed", "sampler", "repeats", "optuna_storage", "objectives", "variants", "dimensions", "fixed",
    "data.name", "data.seed", "data.val_fraction", "data.train_subset", "data.label_noise", "data.img_size",
    "budget.num_samples", "budget.max_concurrent", "budget.time_limit_s", "resources.cpu", "resources.gpu",
    "scheduler", "scheduler.name", "scheduler.grace_period", "scheduler.reduction_factor", "scheduler.max_t",
    "sampler_options.n_startup_trials", "sampler_options.gamma", "sampler_options.population_size",
    "sampler_options.multivariate", "objectives.test_accuracy", "objectives.unique_params", "objectives.macs",
    "constraints.unique_params.max", "hypervolume_reference.unique_params", "variants.small.dim", "variants.deep",
    "dimensions.variant.choice", "dimensions.hash.when", "dimensions.alpha.step",
    *(f"fixed.{name}" for name in SETTINGS),
    *(f"dimensions.{name}.{kind}" for name in ("alpha", "sparsity", "table_size", "share_rate", "dim", "patch_size", "lr",
                                              "batch_size", "seed", "hidden", "epochs") for kind in KINDS),
]
WORDS = ["../x", "it's", 'a"b', "a/b", "", "zzz", "zzz://x", "sqlite:///no/such/dir/x.db", "dirichlet", "identity", "mean",
         "cka", "asha", "moasha", "tpe", "gp", "nsga2", "grid", "max", "min", "spin", "arbnet", "synthetic", "deit_tiny",
         "pointwise", "sequential", "x" * 300, "1e12", "\x00", "é"]
NUMBERS = [0, 1, -1, 2, 3, 7, 2**31, 2**32, 2**63, 2**64, 10**12, 0.0, 0.5, 0.999, 1.0, 1.5, -1e-9, 1e12, math.inf, -math.inf, math.nan]
leaves = st.one_of(
    st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS), st.text(max_size=8),
)
values = st.recursive(
    leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from([*KINDS, "step", "when", "min", "max", *SETTINGS[:6]]), st.text(max_size=5),
                                  st.integers(-3, 3)), inner, max_size=3)),
    max_leaves=6,
)
set_strings = st.one_of(st.text(max_size=20), st.sampled_from(["[1,", "{a: 1, a: 2}", "&a [*a, *a]", "!!python/object:os.system x",
                                                             "[" * 50 + "]" * 50, ".inf", ".nan", "1e12", "{1: 2}", "~"]))
plausible = st.sampled_from([1, 2, 3, 4, 8, 16, 0.1, 0.5, 0.9, True, "uniform", "dirichlet", "modulus", "sequential", "strided",
                             "pointwise", "mean", "cosine", "adamw", [8], [8, 8], {"choice": [1, 2]}, {"uniform": [0.1, 0.5]},
                             {"int": [1, 4]}, {"loguniform": [0.01, 1.0]}])
mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), plausible),  # near misses and valid changes
    st.tuples(st.just("set"), st.one_of(st.sampled_from(PATHS), st.text(max_size=6)), values),
    st.tuples(st.just("override"), st.sampled_from(PATHS), set_strings),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
)


def mutate(raw: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
    if value is None and isinstance(node, dict):
        node.pop(leaf, None)
    else:
        node[leaf] = value


def validate(raw: dict, data_cache: dict) -> SearchSpec:
    """What `sharetune search` runs before Ray: parse, then the dry runs on the spec's data."""
    spec = parse_spec(raw)
    key = tuple(sorted(spec.data.model_dump().items()))
    if key not in data_cache:
        data_cache[key] = load(**spec.data.model_dump())
    data = data_cache[key]
    if spec.sampler_options or spec.sampler not in ("tpe", "random", "grid", "nsga2"):
        rehearse_sampler(spec)  # the slow part of the dry run: here where a mutation reached the sampler
    for settings in spec.extreme_settings():
        check_model(settings, data)
    return spec


def train_one_batch(spec: SearchSpec) -> bool:
    """Build the first extreme's model and train one batch of tiny data; False if too big to try here."""
    settings = spec.extreme_settings()[0]
    if settings.batch_size > 256 or getattr(settings, "dim", None) and settings.dim > 256:
        return False
    settings = settings.model_copy(update={"epochs": 1, "compile": False})  # compiling takes a minute on 2 cores
    data = load("synthetic", train_subset=settings.batch_size, test_subset=64, val_fraction=0).with_resolution(settings.resolution)
    torch.manual_seed(settings.seed)
    model = build_model(settings, data)
    if costs_of(model, data).unique_params > 2_000_000:
        return False
    epoch = next(train_epochs(model, data, settings, device="cpu"))
    assert epoch.epoch == 1 and 0 <= epoch.test_accuracy <= 1
    return True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_any_spec_is_accepted_or_one_line_and_accepted_ones_train():
    seen, accepted, trained, data_cache = [], [], [], {}

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(base=st.sampled_from(BASES), mutations=st.lists(mutation, min_size=1, max_size=3))
    def check(base, mutations):
        raw = copy.deepcopy(base)
        try:
            for kind, path, value in mutations:
                if kind == "override":
                    raw = apply_overrides(raw, [f"{path}={value}"])
                else:
                    mutate(raw, path, value)
            spec = validate(raw, data_cache)
        except (SpecError, DataError) as err:  # the one line the CLI prints
            assert str(err) and "\n" not in str(err), repr(str(err))
            seen.append("refused")
            return
        seen.append("accepted")
        accepted.append(spec)
        if len(trained) < TRAINED + 10 and train_one_batch(spec):
            trained.append(spec)

    check()
    assert len(seen) >= EXAMPLES
    assert seen.count("refused") > EXAMPLES // 10 and len(accepted) > TRAINED, (seen.count("refused"), len(accepted))
    assert len(trained) >= TRAINED
