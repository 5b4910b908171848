"""Searches that spend less: constraints known before training, no repeated configuration, repeated
seeds. The searcher alone against real Optuna studies, then whole searches through real Ray and MLflow."""

import tracemalloc
import warnings

import optuna
import pandas as pd
import pytest
from helpers import tiny_spec
from mlflow.tracking import MlflowClient

from sharetune.metrics import ModelCosts
from sharetune.search import console, report, tuner
from sharetune.search.listing import describe
from sharetune.search.searcher import CONFIGURATION, ConfigurationSearcher
from sharetune.search.storage import SearchFolder
from sharetune.spaces import OptunaSpace, SpecError, parse_spec

TABLE_SIZES = [8, 64, 512]


def table_spec(**changes) -> dict:
    """A tiny spec searching only the table size."""
    return tiny_spec(**{"fixed": {"epochs": 2, "hidden": [16], "hash": "uniform"},
                        "dimensions": {"table_size": {"choice": TABLE_SIZES}}, **changes})


def table_costs(config: dict) -> ModelCosts:
    """Costs that grow with the table, as an ArbNet's do (a stand-in for building the model)."""
    size = config["table_size"]
    return ModelCosts(unique_params=size, virtual_params=1000, macs=1000, effective_share_rate=1000 / size)


def searcher_for(tmp_path, spec: dict, **options) -> tuple[ConfigurationSearcher, optuna.Study]:
    parsed = parse_spec(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                                directions=[f"{mode}imize" for mode in parsed.objectives.values()])
    searcher = ConfigurationSearcher(OptunaSpace(parsed), parsed.objectives, study, SearchFolder(tmp_path / "search"),
                                     num_samples=parsed.num_samples(), repeats=parsed.repeats,
                                     constraints=parsed.constraints, space_size=parsed.distinct_configurations(), **options)
    return searcher, study


def test_a_repeated_proposal_trains_nothing_and_is_told_the_first_ones_values(tmp_path):
    spec = table_spec(budget={"num_samples": 10})
    searcher, study = searcher_for(tmp_path, spec)
    configs = []
    while (config := searcher.suggest(f"t{len(configs)}")) != ConfigurationSearcher.FINISHED:
        configs.append(config)
        assert config is not None and len(configs) <= len(TABLE_SIZES)
    # the random sampler asks for 10 configurations of a space of 3: each is trained once, then the search ends
    assert sorted(c["table_size"] for c in configs) == TABLE_SIZES
    duplicates = searcher.folder.skipped()
    assert duplicates and {d["kind"] for d in duplicates} == {"duplicate"}
    first_of = {c["table_size"]: c[CONFIGURATION] for c in configs}
    assert all(d["duplicate_of"] == first_of[d["config"]["table_size"]] for d in duplicates)
    for i, config in enumerate(configs):
        searcher.on_trial_complete(f"t{i}", {"test_accuracy": config["table_size"] / 1000})
    told = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(told) == len(configs) + len(duplicates)  # every duplicate was told once its first one finished
    assert all(t.value == t.params["table_size"] / 1000 for t in told)


def test_an_infeasible_proposal_is_never_trained_and_the_sampler_is_told_so(tmp_path):
    spec = table_spec(budget={"num_samples": 2}, objectives={"test_accuracy": "max", "unique_params": "min"}, sampler="nsga2",
                     constraints={"unique_params": {"max": 100}})
    searcher, study = searcher_for(tmp_path, spec, costs=table_costs)
    configs = [searcher.suggest("a"), searcher.suggest("b")]
    assert sorted(c["table_size"] for c in configs) == [8, 64]
    assert searcher.suggest("c") == ConfigurationSearcher.FINISHED  # num_samples counts trained configurations
    infeasible = [e for e in searcher.folder.skipped() if e["kind"] == "infeasible"]
    assert infeasible and {e["config"]["table_size"] for e in infeasible} == {512}
    assert infeasible[0]["costs"]["unique_params"] == 512 and infeasible[0]["violations"]["unique_params"] > 0
    (trial,) = [t for t in study.trials if t.number == infeasible[0]["config"][CONFIGURATION]]
    # complete, with its real cost, no accuracy, and a positive constraint: what NSGA-II ranks below feasible ones
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [0.0, 512.0]
    assert trial.constraints == {"unique_params": pytest.approx((512 - 100) / 100)}
    feasible = [t for t in study.trials if t.params["table_size"] != 512]
    assert all(t.constraints["unique_params"] <= 0 for t in feasible)


@pytest.mark.parametrize("infeasible", TABLE_SIZES)
def test_a_finite_space_ends_once_its_last_configuration_is_proposed_an_infeasible_one_too(tmp_path, infeasible):
    """Whichever configuration the sampler proposes last, nothing is asked after it (a walk's grid search
    logged 99 duplicates after its last, infeasible, configuration, and warned the space was exhausted)."""
    def costs(config: dict) -> ModelCosts:
        return table_costs({"table_size": 10_000 if config["table_size"] == infeasible else 10})

    spec = table_spec(budget={"num_samples": 10}, constraints={"unique_params": {"max": 100}})
    searcher, study = searcher_for(tmp_path, spec, costs=costs)
    configs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "the sampler proposed 100 configurations in a row ..."
        while (config := searcher.suggest(f"t{len(configs)}")) != ConfigurationSearcher.FINISHED:
            configs.append(config)
    assert sorted(c["table_size"] for c in configs) == sorted(set(TABLE_SIZES) - {infeasible})
    proposed = [t.params["table_size"] for t in study.trials]
    assert proposed[-1] not in proposed[:-1]  # the last question asked was a new configuration
    assert [e["config"]["table_size"] for e in searcher.folder.skipped() if e["kind"] == "infeasible"] == [infeasible]


def test_repeats_train_each_configuration_with_consecutive_seeds_and_tell_the_mean(tmp_path):
    spec = table_spec(budget={"num_samples": 2}, repeats=3, fixed={"epochs": 2, "hidden": [16], "seed": 5})
    searcher, study = searcher_for(tmp_path, spec)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert searcher.suggest("t6") == ConfigurationSearcher.FINISHED
    assert [c["seed"] for c in configs] == [5, 6, 7, 5, 6, 7]
    assert configs[0][CONFIGURATION] == configs[2][CONFIGURATION] != configs[3][CONFIGURATION]
    accuracies = [0.5, 0.6, 0.9, 0.1, 0.2, 0.3]
    for i, accuracy in enumerate(accuracies):
        searcher.on_trial_complete(f"t{i}", {"test_accuracy": accuracy})
    values = sorted(t.value for t in study.trials)
    assert values == pytest.approx([0.2, (0.5 + 0.6 + 0.9) / 3])


@pytest.mark.parametrize("changes, message", [
    ({"constraints": {"test_accuracy": {"min": 0.5}}}, "constraints: 'test_accuracy' is not known before training"),
    ({"constraints": {"macs": {}}}, "constraints.macs: give max, min or both"),
    ({"constraints": {"macs": {"max": 1, "min": 2}}}, "constraints.macs: min 2.0 is above max 1.0"),
    ({"constraints": {"macs": {"max": -1}}}, "constraints.macs: max -1.0: costs are never negative, so no proposal would meet it"),
    ({"constraints": {"macs": {"max": "x"}}}, "constraints.macs.max"),
    ({"repeats": 0}, "repeats: "),
    ({"repeats": 3, "fixed": {"seed": 2**32 - 2}}, "^repeats: 3 seeds from seed 4294967294 pass the largest seed, 4294967295; "
                                                   "allowed: a seed up to 4294967293$"),
    ({"repeats": 2, "dimensions": {"seed": {"int": [0, 3]}}}, "repeats: the seed is searched"),
    ({"repeats": 2, "scheduler": {"name": "asha"}}, "repeats: asha would stop a configuration's seeds at different epochs"),
    ({"constraints": {"macs": {"max": 1e6}}, "sampler": "cmaes"}, "constraints: the cmaes sampler ignores them.*allowed: tpe, random"),
    ({"fixed": {"epochs": 4}, "scheduler": {"name": "asha", "max_t": 10, "grace_period": 5}},
     r"scheduler.max_t: 10 epochs is more than any trial trains \(4\); allowed: up to 4"),
    ({"fixed": {"epochs": [1, 2]}, "scheduler": {"name": "asha"}}, "^fixed.epochs: Input should be a valid integer$"),
    ({"dimensions": {"epochs": {"choice": ["a", 3]}}, "fixed": {}, "scheduler": {"name": "asha"}}, "^dimensions.epochs: "),
    ({"variants": {"long": {"epochs": "x"}}, "fixed": {"variant": "long"}, "scheduler": {"name": "asha"}}, "^variants.long.epochs: "),
])
def test_bad_constraint_and_repeat_specs_name_the_field(changes, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny_spec(**changes))


def test_the_number_of_distinct_configurations_counts_conditional_dimensions_once():
    spec = parse_spec(table_spec(dimensions={"hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"choice": [0.1, 1.0]},
                                             "table_size": {"int": [8, 32], "step": 8}}, fixed={"epochs": 2}))
    assert spec.distinct_configurations() == (1 + 2) * 4  # alpha only for dirichlet
    assert parse_spec(tiny_spec()).distinct_configurations() is None  # alpha is continuous
    seeds = parse_spec(table_spec(dimensions={"seed": {"int": [0, 10**6]}}, fixed={"epochs": 2}))
    tracemalloc.start()
    assert seeds.distinct_configurations() is None  # too many to count, known before listing any
    assert tracemalloc.get_traced_memory()[1] < 2**20  # listing these seeds took 36 MB (and 2**32 seeds, 150 GB)
    tracemalloc.stop()


def test_a_search_with_constraints_repeats_and_duplicates_through_ray_and_mlflow(tmp_path, local_ray):
    spec = parse_spec(table_spec(
        objectives={"test_accuracy": "max", "unique_params": "min"}, sampler="random", repeats=2, constraints={"unique_params": {"max": 500}}, budget={"num_samples": 4, "max_concurrent": 2},
        optuna_storage=(storage := f"sqlite:///{tmp_path}/optuna.db"),
    ))
    result = tuner.run(spec, storage=str(tmp_path / "results"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    trials = report.trials_from_folder(result.folder)
    trained = trials[trials["status"] == "TERMINATED"]
    skipped = trials[trials["status"].isin(["INFEASIBLE", "DUPLICATE"])]
    assert len(trials) == len(trained) + len(skipped)
    # 512-entry tables break the constraint; the two others are trained with two seeds each, once
    assert sorted(trained["table_size"]) == [8, 8, 64, 64] and sorted(trained["seed"]) == [0, 0, 1, 1]
    assert str(trials["seed"].dtype) == "Int64"  # whole numbers in trials.csv, beside the skipped proposals' none
    infeasible = trials[trials["status"] == "INFEASIBLE"]
    assert set(infeasible["table_size"]) == {512} and (infeasible["unique_params"] > 500).all()
    assert (trained["unique_params"] <= 500).all()
    listed = describe(result.folder)  # `sharetune list`: the 4 trials of the 8 asked for that the space held
    assert (listed.status, listed.done, listed.planned) == ("finished", 4, 4)
    assert spec.expected_trials() == 6  # what the progress counts on: the space's 3 configurations, two seeds each (not 8)
    assert console.space_note(trials, spec) == ("4 of the 8 planned trials: the space holds 3 configurations, 1 of them "
                                                 "outside the constraints, and the search proposed each once")
    means = trained.groupby("table_size")["test_accuracy"].mean()  # the best configuration, as the summary ranks them
    assert listed.best == {"test_accuracy": pytest.approx(means.max()), "unique_params": trained["unique_params"].min()}

    built = report.build_report(trials, tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "configurations.csv")
    done = table[table["status"] == "TERMINATED"].set_index("table_size")
    assert sorted(done.index) == [8, 64] and set(done["repeats"]) == {2}
    for size, group in trained.groupby("table_size"):
        assert done.loc[size, "test_accuracy"] == pytest.approx(group["test_accuracy"].mean())
        assert done.loc[size, "test_accuracy_std"] == pytest.approx(group["test_accuracy"].std())
    assert set(built.fronts["unique_params"]["table_size"]) <= {8, 64}

    client = MlflowClient(result.mlflow_uri)
    experiment = client.get_experiment_by_name("tiny")
    children = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''", max_results=100)
    kinds = pd.Series([c.data.tags.get("sharetune.kind", "trained") for c in children]).value_counts().to_dict()
    assert kinds["trained"] == 4 and kinds["infeasible"] == len(infeasible)
    assert kinds["duplicate"] == (trials["status"] == "DUPLICATE").sum() > 0  # the random sampler repeats itself
    first_trials = trained.groupby("table_size")["trial_id"].agg(set).to_dict()
    for child in children:
        if child.data.tags.get("sharetune.kind") == "infeasible":
            assert child.data.params["table_size"] == "512" and child.data.metrics["unique_params"] > 500
            assert "test_accuracy" not in child.data.metrics
        if child.data.tags.get("sharetune.kind") == "duplicate" and child.data.params["table_size"] != "512":
            assert set(child.data.tags["sharetune.duplicate_of"].split(",")) == first_trials[int(child.data.params["table_size"])]
    of_infeasible = [c for c in children if c.data.tags.get("sharetune.kind") == "duplicate" and c.data.params["table_size"] == "512"]
    assert of_infeasible and {c.data.tags["sharetune.duplicate_of"] for c in of_infeasible} == {f"configuration {infeasible[CONFIGURATION].item()}"}
    # Optuna saw each configuration once, with the mean over its seeds
    study = optuna.load_study(study_name=result.folder.name, storage=storage)
    assert study.metric_names == ["test_accuracy", "unique_params"]
    for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        if trial.user_attrs.get("tune_trials"):  # trained: its attribute finds its Tune trials' MLflow runs
            for tune_trial, found in zip(trial.user_attrs["tune_trials"], trial.user_attrs["mlflow_runs"], strict=True):
                (linked,) = client.search_runs([experiment.experiment_id], found)
                assert linked.data.tags["sharetune.trial_id"] == tune_trial
        if trial.params["table_size"] != 512:
            assert trial.values == pytest.approx([done.loc[trial.params["table_size"], "test_accuracy"],
                                                  done.loc[trial.params["table_size"], "unique_params"]])
