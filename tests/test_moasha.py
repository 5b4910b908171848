"""Multi-objective successive halving: the ranking, the scheduler's decisions, and a real search; ASHA's
rungs kept for a resumed search."""

import json
import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import tiny_spec
from ray.tune.experiment import Trial

from sharetune.search import SearchFolder, report, tuner
from sharetune.search.asha import KeptASHA
from sharetune.search.moasha import MOASHA, contributions, fronts, going_on, ranks_ahead
from sharetune.search.storage import StateError
from sharetune.spaces import SpecError, parse_spec

OBJECTIVES = {"test_accuracy": "max", "unique_params": "min"}


def test_fronts_and_hypervolume_contributions_rank_a_known_set():
    points = np.array([[0, 3], [1, 1], [3, 0], [2, 2], [3, 3]], float)  # minimised
    reference = np.array([4.0, 4.0])
    assert [f.tolist() for f in fronts(points)] == [[0, 1, 2], [3], [4]]
    assert [f.tolist() for f in fronts(np.vstack([[np.inf, np.inf], points, [np.inf, np.inf]]))] == [[1, 2, 3], [4], [5], [0, 6]]
    # Exclusive boxes from the reference: [0,1)x[3,4), [1,3)x[1,3), [3,4)x[0,1).
    assert contributions(points[[0, 1, 2]], reference).tolist() == pytest.approx([1.0, 4.0, 1.0])
    assert [ranks_ahead(points, reference, i) for i in range(5)] == [1, 0, 1, 3, 4]  # the front's ends after its middle
    assert contributions(np.array([[1.0, 5.0], [2.0, 2.0]]), reference).tolist() == [0.0, 4.0]  # past the reference: clipped


def test_the_top_third_rounded_down_goes_on_and_the_first_trial_at_a_rung_always_does():
    assert [going_on(n, 3) for n in range(1, 10)] == [1, 1, 1, 1, 1, 2, 2, 2, 3]
    assert [going_on(n, 2) for n in range(1, 6)] == [1, 1, 1, 2, 2]


def test_the_scheduler_stops_a_trial_only_when_enough_recorded_trials_rank_ahead():
    scheduler = MOASHA(OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3)
    assert list(scheduler.rungs) == [1, 3]

    def report_at(name: str, epoch: int, accuracy: float, params: int) -> str:
        trial = Trial("train_trial", stub=True, trial_id=name)
        return scheduler.on_trial_result(None, trial, {"epoch": epoch, "test_accuracy": accuracy, "unique_params": params,
                                                       "virtual_params": 1000})

    cost_only = scheduler.on_trial_result(None, Trial("train_trial", stub=True, trial_id="a"), {"epoch": 0, "unique_params": 100})
    assert cost_only == "CONTINUE"  # the costs, before training: no rung
    assert report_at("a", 1, 0.5, 100) == "CONTINUE"  # first at its rung
    assert report_at("b", 1, 0.9, 50) == "CONTINUE"  # dominates a
    assert report_at("c", 1, 0.4, 200) == "STOP"  # dominated by both; 2 of 3 ahead >= going_on(3) = 1
    # On the front with b, but adding little from the reference (accuracy 0, the dense 1000 parameters):
    # (1000 - 400) x 0.05 = 30 against b's (400 - 50) x 0.9 = 315.
    assert report_at("d", 1, 0.95, 400) == "STOP"
    assert report_at("e", 1, 0.99, 60) == "CONTINUE"  # (1000 - 60) x 0.09 = 84.6 against b's (60 - 50) x 0.9 = 9
    assert report_at("a", 2, 0.6, 100) == "CONTINUE"  # between rungs: no decision
    assert report_at("a", 3, 0.6, 100) == "CONTINUE" and report_at("a", 3, 0.6, 100) == "CONTINUE"  # decided once
    assert report_at("b", 3, 0.5, 60) == "STOP"  # a front's smallest model, adding (100 - 60) x 0.5 = 20 against a's 90
    assert report_at("e", 3, 0.8, 80) == "CONTINUE"  # dominates a
    assert scheduler.stopped == 3


def test_a_resumed_search_ranks_against_the_rungs_recorded_before_it_stopped(tmp_path):
    folder = SearchFolder(tmp_path)

    def report_at(scheduler: MOASHA, name: str, accuracy: float, params: int) -> str:
        return scheduler.on_trial_result(None, Trial("train_trial", stub=True, trial_id=name),
                                         {"epoch": 1, "test_accuracy": accuracy, "unique_params": params, "virtual_params": 1000})

    started = MOASHA(OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3, store=folder)
    at_start = pickle.dumps(started)  # what Tune keeps (tuner.pkl) and rebuilds the scheduler from on resume
    assert report_at(started, "a", 0.9, 50) == "CONTINUE" and report_at(started, "b", 0.5, 100) == "STOP"
    resumed = pickle.loads(at_start)
    assert report_at(resumed, "c", 0.4, 200) == "STOP"  # behind a and b, recorded before the search stopped
    assert resumed.stopped == 2 and set(resumed.rungs[1]) == {"a", "b", "c"}
    assert report_at(MOASHA(OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3), "c", 0.4, 200) == "CONTINUE"  # empty rungs: first
    earlier = pickle.loads(at_start)  # as an earlier version pickled it: no store; it ranks in memory
    del earlier.__dict__["store"], earlier.__dict__["restored"]
    assert report_at(earlier, "a", 0.9, 50) == "CONTINUE" and report_at(earlier, "b", 0.5, 100) == "STOP"


def test_a_resumed_asha_search_ranks_against_the_rungs_recorded_before_it_stopped(tmp_path):
    """Ray's ASHA as Tune rebuilds it on resume (from the pickle taken at the start) forgot its rungs."""
    def report_at(scheduler: KeptASHA, name: str, epoch: int, accuracy: float) -> str:
        trial = Trial("train_trial", stub=True, trial_id=name)
        if name not in scheduler._trial_info:
            scheduler.on_trial_add(None, trial)
        return scheduler.on_trial_result(None, trial, {"epoch": epoch, "test_accuracy": accuracy})

    def asha(store=None) -> KeptASHA:
        return KeptASHA(time_attr="epoch", metric="test_accuracy", mode="max", max_t=9, grace_period=1, reduction_factor=3, store=store)

    started = asha(SearchFolder(tmp_path))
    at_start = pickle.dumps(started)
    assert [report_at(started, name, 1, accuracy) for name, accuracy in (("a", 0.9), ("b", 0.1), ("c", 0.95))] == ["CONTINUE", "STOP", "CONTINUE"]
    written = (tmp_path / KeptASHA.RUNGS_FILE).stat().st_mtime_ns
    assert report_at(started, "a", 2, 0.95) == "CONTINUE"
    assert (tmp_path / KeptASHA.RUNGS_FILE).stat().st_mtime_ns == written  # between rungs: nothing changed, nothing written
    resumed = pickle.loads(at_start)
    assert report_at(resumed, "d", 1, 0.2) == "STOP"  # below the top third of a, b and c, recorded before the search stopped
    assert resumed._num_stopped == 2
    assert report_at(asha(), "d", 1, 0.2) == "CONTINUE"  # what Ray's own did on resume: empty rungs, the first goes on
    assert json.loads((tmp_path / KeptASHA.RUNGS_FILE).read_text())["brackets"][0][-1] == {"a": 0.9, "b": 0.1, "c": 0.95, "d": 0.2}


def test_the_spec_reference_point_replaces_the_dense_cost():
    def decision(reference: dict) -> str:
        scheduler = MOASHA(OBJECTIVES, max_t=3, grace_period=1, reduction_factor=3, reference=reference)
        for name, accuracy, params in [("small", 0.5, 10), ("large", 0.6, 100)]:
            told = scheduler.on_trial_result(None, Trial("train_trial", stub=True, trial_id=name),
                                             {"epoch": 1, "test_accuracy": accuracy, "unique_params": params, "virtual_params": 1000})
        return told

    assert decision({}) == "CONTINUE"  # large adds (1000 - 100) x 0.1 = 90, small (100 - 10) x 0.5 = 45
    assert decision({"unique_params": 150}) == "STOP"  # large adds (150 - 100) x 0.1 = 5 against small's 45


def test_a_diverged_value_ranks_last_and_breaks_nothing():
    scheduler = MOASHA({"test_accuracy": "max", "loss": "min"}, max_t=3, grace_period=1, reduction_factor=3)

    def report_at(name: str, accuracy: float, loss: float) -> str:
        return scheduler.on_trial_result(None, Trial("train_trial", stub=True, trial_id=name),
                                         {"epoch": 1, "test_accuracy": accuracy, "loss": loss})

    assert report_at("a", 0.5, 1.0) == "CONTINUE"
    assert report_at("b", 0.9, float("nan")) == "STOP"  # more accurate, but its loss diverged
    assert report_at("c", 0.6, 0.5) == "CONTINUE"  # dominates a; b, with the worst loss, is behind it


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"objectives": {"test_accuracy": "max"}, "scheduler": {"name": "moasha"}},
         "scheduler: moasha ranks several objectives; for one objective use name: asha"),
        ({"objectives": OBJECTIVES, "scheduler": {"name": "asha"}}, "scheduler: ASHA prunes on one metric; for several objectives use name: moasha"),
        ({"objectives": OBJECTIVES, "scheduler": {"name": "hyperband"}}, "scheduler.name: got 'hyperband'; allowed: 'asha' or 'moasha'"),
        ({"objectives": OBJECTIVES, "scheduler": {"name": "moasha", "reduction_factor": 1}}, "scheduler.reduction_factor: got 1"),
        ({"objectives": OBJECTIVES, "scheduler": {"name": "moasha", "grace_period": 2}},
         r"scheduler.grace_period: 2 epochs leaves no rung below a full trial's 2; give fewer than 2"),
        ({"objectives": OBJECTIVES, "scheduler": {"name": "moasha"}, "fixed": {"epochs": 1}},
         r"scheduler: early stopping needs a full trial of 2 epochs or more \(here 1\); give more epochs, or scheduler: null$"),
    ],
)
def test_bad_scheduler_specs_name_the_field(changes, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny_spec(**changes))


def test_a_moasha_search_stops_dominated_trials_and_tells_the_sampler_their_rung_values(tmp_path, local_ray):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    spec = parse_spec(tiny_spec(
        objectives=OBJECTIVES, sampler="grid", optuna_storage=storage, budget={"max_concurrent": 1},
        scheduler={"name": "moasha", "grace_period": 1, "reduction_factor": 2}, data={"name": "synthetic", "val_fraction": 0},
        fixed={"epochs": 4, "hidden": [16], "hash": "uniform"},
        dimensions={"lr": {"choice": [0.1, 1e-9]}, "table_size": {"choice": [8, 64, 512]}},
    ))
    result = tuner.run(spec, storage=str(tmp_path / "results"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    trials = report.trials_from_folder(result.folder)  # in the order they started, one at a time
    assert len(trials) == 6 and set(trials["status"]) == {"TERMINATED"}
    epochs = {row.trial_id: [json.loads(line) for line in (Path(result.folder) / f"trial_{row.trial_id}" / "result.json").open()]
              for row in trials.itertuples()}
    # Replay each rung in arrival order with the ranking: the scheduler stopped exactly the trials it says.
    for rung in (1, 2):
        recorded, dense = [], []
        for row in trials.itertuples():
            if row.epochs_done < rung:
                continue
            at_rung = next(e for e in epochs[row.trial_id] if e["epoch"] == rung)
            recorded.append([-at_rung["test_accuracy"], at_rung["unique_params"]])
            dense.append(at_rung["virtual_params"])
            reference = np.array([0.0, max(dense)])  # accuracy 0, the dense model's parameters
            stop = ranks_ahead(np.array(recorded), reference, len(recorded) - 1) >= going_on(len(recorded), 2)
            assert (row.epochs_done == rung) == stop, (rung, row.trial_id)
    # The known part: the trained net with 8-entry tables dominates every untrained one, so each
    # untrained trial that reached the first rung after it stopped there.
    best = trials[(trials["lr"] == 0.1) & (trials["table_size"] == 8)].index[0]
    later_untrained = trials[(trials["lr"] == 1e-9) & (trials.index > best)]
    assert len(later_untrained) and set(later_untrained["epochs_done"]) == {1}
    assert (trials["epochs_done"] == 4).any()
    # What the sampler was told: every trial complete, with its objectives where it stopped.
    study = optuna.load_study(study_name=result.folder.name, storage=storage)
    told = {(t.params["lr"], t.params["table_size"]): t for t in study.trials}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for row in trials.itertuples():
        last = epochs[row.trial_id][-1]
        assert told[(row.lr, row.table_size)].values == pytest.approx([last["test_accuracy"], last["unique_params"]])


def _moasha(store: SearchFolder) -> MOASHA:
    return MOASHA(OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3, store=store)


def _asha(store: SearchFolder) -> KeptASHA:
    return KeptASHA(time_attr="epoch", metric="test_accuracy", mode="max", max_t=9, grace_period=1, store=store)


@pytest.mark.parametrize("kept", [b"{", b'{"brackets": 3}', b"[]"], ids=["cut short", "wrong shape", "not a mapping"])
def test_kept_rungs_that_do_not_read_back_are_one_line_naming_the_file(tmp_path, kept):
    folder = SearchFolder(tmp_path)
    for scheduler in (_moasha(folder), _asha(folder)):
        (tmp_path / scheduler.RUNGS_FILE).write_bytes(kept)
        with pytest.raises(StateError, match=rf"^{tmp_path}: {scheduler.RUNGS_FILE} is damaged \(.+\); move it away"):
            scheduler.check_kept()


@pytest.mark.parametrize("scheduler, kept, why", [
    (_asha, {"brackets": [[{"a": "0.5"}, {}]], "stopped": 0}, "brackets.0.0.a: Input should be a valid number"),
    (_asha, {"brackets": [[{"a": 0.5}, {}]], "stopped": 0.5}, "stopped: Input should be a valid integer"),
    (_asha, {"brackets": [[{"a": 0.5}]], "stopped": 0}, "brackets: [1] rungs, where this search has [2]"),
    (_moasha, {"rungs": {"1": {"a": [["x", 1], [0, 0]]}}, "stopped": 0}, "rungs.1.a.0.0: Input should be a valid number"),
    (_moasha, {"rungs": {"2": {}}, "stopped": 0}, "rungs.2: not one of this search's rungs (1, 3)"),
    (_moasha, {"rungs": {"1": {"a": [[0.5], [0, 0]]}}, "stopped": 0},
     "rungs.1.a: a point and a bound of 2 values (one per objective), got 1 and 2"),
], ids=["asha value", "asha count", "asha rungs", "moasha value", "moasha rung", "moasha point"])
def test_kept_rungs_with_values_of_the_wrong_type_or_place_are_refused_before_they_are_loaded(tmp_path, scheduler, kept, why):
    """Right shape, wrong values: they loaded, then failed inside Tune's loop (a traceback) or, as an
    unknown rung, ranked trials where the search has no rung."""
    scheduler = scheduler(SearchFolder(tmp_path))
    (tmp_path / scheduler.RUNGS_FILE).write_text(json.dumps(kept))
    with pytest.raises(StateError) as refused:
        scheduler.check_kept()
    assert str(refused.value) == f"{tmp_path}: {scheduler.RUNGS_FILE} is damaged ({why}); move it away to resume with " \
        "empty rungs (the scheduler then ranks the next trials against new ones)"


def test_rungs_holding_a_diverged_trials_values_read_back(tmp_path):
    """At their worst the files hold a diverged trial's values (NaN from Ray's ASHA, infinity from
    MO-ASHA), written as JSON's NaN and Infinity: the strict read takes them."""
    folder = SearchFolder(tmp_path)
    diverged = {"epoch": 1, "test_accuracy": float("nan"), "unique_params": 10, "virtual_params": 1000}
    _moasha(folder).on_trial_result(None, Trial("train_trial", stub=True, trial_id="a"), diverged)
    asha, trial = _asha(folder), Trial("train_trial", stub=True, trial_id="b")
    asha.on_trial_add(None, trial)
    asha.on_trial_result(None, trial, diverged)
    moasha, asha = _moasha(folder), _asha(folder)
    moasha.check_kept()
    asha.check_kept()
    assert np.isinf(moasha.rungs[1]["a"][0]).all()
    assert "NaN" in (tmp_path / KeptASHA.RUNGS_FILE).read_text() and np.isnan(asha._brackets[0]._rungs[-1][1]["b"])  # rung 1
