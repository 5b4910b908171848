"""The package's shape: layers import only downwards, no private names cross modules, one name per
setting and metric, and one owner for every default (the CLI and a trial build the same model)."""

import ast
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import tiny_spec
from typer.testing import CliRunner

from sharetune.cli import app
from sharetune.data import load
from sharetune.metrics import METRICS
from sharetune.models import hashes
from sharetune.models.hashes import Hashed, register_hash
from sharetune.spaces import FAMILIES, ArbNetSettings, OptunaSpace, SpecError, parse_spec
from sharetune.trainables import build_model, costs_of

PACKAGE = Path(__file__).resolve().parents[1] / "sharetune"
# Each layer may import itself and the layers before it: configuration flows spec -> space -> trial
# settings -> model -> training -> metrics -> MLflow, and each step is built on the ones below.
LAYERS = [{"metrics", "data", "analysis", "storage_filesystem", "errors", "text", "ema", "cache"}, {"models"}, {"recipes", "training"}, {"spaces"}, {"trainables"}, {"search"}, {"job_commands"}, {"cli", "launch"}]
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def sharetune_imports(path: Path):
    """(module imported, names imported) for every sharetune import in the file, lazy ones too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sharetune"):
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names if alias.name.startswith("sharetune"))


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_package_has_a_layer():
    assert {package_of(p) for p in modules()} == set(LAYER_OF)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_layer_imports_a_higher_one_or_another_package_internals(path):
    own = package_of(path)
    for module, names in sharetune_imports(path):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else None
        assert target is not None, f"{path.name}: imports the sharetune package itself"
        assert LAYER_OF[target] <= LAYER_OF[own], f"{own} (layer {LAYER_OF[own]}) imports {module} (layer {LAYER_OF[target]})"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name} imports private {private} from {module}"
        if target in ("trainables",) and own != target:
            assert module == "sharetune.trainables", f"{own} imports trainables' internals: {module}"


def test_train_repeats_from_its_seed_as_a_trial_does():
    """`sharetune train` drew its model's weights from wherever torch's generator stood (a walk's two
    runs of one command differed from the first epoch); the model is built from the seed now."""
    runs = [CliRunner().invoke(app, ["train", "spin", "--dataset", "synthetic", "--epochs", "2", "--dim", "8", "--depth", "2",
                                     "--patch-size", "2", "--json"]) for _ in range(2)]
    assert all(run.exit_code == 0 for run in runs), runs[0].output
    first, second = (json.loads(run.output.strip().splitlines()[-1]) for run in runs)
    assert first["loss"] == second["loss"] and first["test_accuracy"] == second["test_accuracy"]


def test_only_lr_is_both_a_setting_and_a_metric():
    # the setting is the initial rate, the metric each epoch's; reports show the metric as final_lr
    for family, settings in FAMILIES.items():
        assert set(settings.model_fields) & set(METRICS) == {"lr"}, family


def test_the_cli_and_a_trial_build_the_same_model_from_the_same_defaults():
    result = CliRunner().invoke(app, ["train", "arbnet", "--dataset", "synthetic", "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert "val_accuracy" in printed  # the data defaults a search's trial gets: the val split held out
    settings = ArbNetSettings(epochs=1)  # what a trial with no fixed settings parses to
    assert settings.hash == "dirichlet" and settings.table_size == 1000 and settings.epochs == 1
    costs = costs_of(build_model(settings, load("synthetic")), load("synthetic"))
    assert {k: printed[k] for k in ("unique_params", "virtual_params", "macs")} == {
        "unique_params": costs.unique_params, "virtual_params": costs.virtual_params, "macs": costs.macs}
    assert printed["entropy"] == pytest.approx(costs.entropy)
    assert costs.unique_params == 3 * 1000 + (200 + 200 + 4) * 3  # three 1000-entry tables; biases and BatchNorms


def test_a_new_hash_option_is_one_definition_for_validation_and_the_space():
    @register_hash("test_windowed")
    def windowed(shape, table_size, rng, *, radius: int = 1):
        return Hashed(np.arange(int(np.prod(shape))) % table_size)

    try:
        assert ArbNetSettings.conditions()["radius"] == {"hash": ["neighborhood", "test_windowed"]}
        assert ArbNetSettings(hash="test_windowed", radius=3).radius == 3
        with pytest.raises(ValueError, match="radius: applies only to hash 'neighborhood' or 'test_windowed', not 'uniform'"):
            ArbNetSettings(hash="uniform", radius=3)
        spec = parse_spec(tiny_spec(dimensions={"hash": {"choice": ["uniform", "test_windowed"]}, "radius": {"int": [0, 5]}}))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(12):
            trial = study.ask()
            OptunaSpace(spec)(trial)
            assert ("radius" in trial.params) == (trial.params["hash"] == "test_windowed")
            seen.add(trial.params["hash"])
            study.tell(trial, 0.5)
        assert seen == {"uniform", "test_windowed"}
    finally:
        hashes._HASHES.pop("test_windowed")
    with pytest.raises(SpecError, match="dimensions.hash: unknown hash 'test_windowed'"):
        parse_spec(tiny_spec(dimensions={"hash": {"choice": ["uniform", "test_windowed"]}}))


def test_a_hash_option_left_out_is_the_hashs_own_default_and_a_trials_run_records_it():
    """The hash's signature owns the default (dirichlet's alpha 1.0, neighborhood's radius 0); the settings
    fill it in, so MLflow and reports show the value trained with instead of None."""
    from sharetune.search.mlflow_logger import effective_params

    dirichlet, neighborhood = (effective_params({"family": "arbnet", "hash": h}) for h in ("dirichlet", "neighborhood"))
    assert (dirichlet["alpha"], dirichlet["radius"]) == (1.0, None)
    assert (neighborhood["alpha"], neighborhood["radius"]) == (None, 0)
    data = load("synthetic")
    implicit, explicit = (build_model(ArbNetSettings(**options), data) for options in ({}, {"alpha": 1.0}))
    assert all(torch.equal(a.index, b.index) for a, b in zip(implicit.modules(), explicit.modules()) if hasattr(a, "index"))
