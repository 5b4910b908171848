"""The live progress of a search: what its status says as trials report, fail and diverge, and the bar
as an 80-column terminal shows it."""

import io
import pickle
from types import SimpleNamespace

from rich.console import Console

from sharetune.metrics import STEP
from sharetune.search import progress as progress_module
from sharetune.search.progress import Progress, StartSteps, StatusBar, terminal_console


def trial(trial_id: str, status: str = "RUNNING") -> SimpleNamespace:
    """What Progress reads of a Tune trial (a failed one's error comes from get_error)."""
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={}, error_file=None,
                           get_error=lambda: "ValueError: table_size: 0 is too small")


def test_the_status_names_the_best_trial_and_forgets_one_that_fails(capsys):
    progress = Progress({"val_accuracy": "max", "unique_params": "min"}, total=4, epochs=3)
    trials = [trial("a"), trial("b"), trial("c")]
    for t, accuracy, params in [(trials[0], 0.9, 500), (trials[1], 0.7, 100), (trials[2], 0.5, 900)]:
        progress.on_trial_result(0, trials, t, {STEP: 1, "val_accuracy": accuracy, "unique_params": params})
    assert progress.status(trials).endswith("leading: val_accuracy 0.9 (trial a), unique_params 100 (trial b); Pareto front 2")
    progress.on_trial_error(0, trials, trials[0])
    assert "trial a failed; the search goes on: ValueError: table_size: 0 is too small" in capsys.readouterr().out
    assert progress.status(trials) == ("2 running (0 diverged, 1 errored), 3 epochs; "
                                       "leading: val_accuracy 0.7 (trial b), unique_params 100 (trial b); Pareto front 1")


def test_a_resumed_search_counts_what_its_trials_did_before_and_its_clock_starts_again(capsys):
    progress = pickle.loads(pickle.dumps(Progress({"val_accuracy": "max"}, total=3, epochs=4)))  # as Tune restores it
    progress.started -= 3600  # pickled when the search first started, an hour ago
    done, cut, failed = trial("a", "TERMINATED"), trial("b", "PAUSED"), trial("c", "ERROR")
    done.last_result, cut.last_result = {STEP: 4, "val_accuracy": 0.8}, {STEP: 2, "val_accuracy": 0.6}
    failed.last_result = {STEP: 1, "val_accuracy": 0.9}  # a failed trial is no one's best
    progress.setup()
    progress.on_step_begin(0, [done, cut, failed])
    progress.show([done, cut, failed], force=True)
    assert capsys.readouterr().out.startswith("[     0s] 2/3 done, eta -:--:--, 0 running (0 diverged, 1 errored), 7 epochs; "
                                              "leading: val_accuracy 0.8 (trial a)")


def test_a_search_an_earlier_version_started_resumes_with_its_progress(capsys):
    """Tune restores the callback the search pickled when it started; one pickled before the ETA counted
    epochs had none of its fields, and the resumed search's first step raised."""
    earlier = Progress({"val_accuracy": "max"}, total=2, epochs=3)
    for name in ("trial_epochs", "steps", "work_at_start"):
        del earlier.__dict__[name]
    restored = pickle.loads(pickle.dumps(earlier))
    restored.setup()
    done = trial("a", "TERMINATED")
    done.last_result = {STEP: 3, "val_accuracy": 0.8}
    restored.on_step_begin(0, [done, trial("b")])
    restored.show([done, trial("b")], force=True)
    assert capsys.readouterr().out.startswith("[     0s] 1/2 done, eta -:--:--, 1 running")


def test_trials_ctrl_c_stopped_are_not_counted_done(capsys):
    """Tune's clean-up after Ctrl-C marks the running trials TERMINATED without completing them: the
    last line showed them done (5/8), beside the search's own line saying 2 of 5 unfinished."""
    progress = Progress({"val_accuracy": "max"}, total=3, epochs=4)
    progress.setup()
    finished, stopped = trial("a"), trial("b")
    progress.on_step_begin(0, [finished, stopped])
    progress.on_trial_complete(0, [finished, stopped], finished)
    finished.status = stopped.status = "TERMINATED"
    progress.show([finished, stopped], force=True)
    assert capsys.readouterr().out.splitlines()[-1].startswith("[     0s] 1/3 done, eta ")


def test_off_a_terminal_a_line_comes_every_ten_seconds_while_no_trial_reports(capsys, monkeypatch):
    """A walk's slow epochs showed no line for 55 s: lines came only with results."""
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress = Progress({"val_accuracy": "max"}, total=2, epochs=5)
    progress.setup()
    running = [trial("a"), trial("b")]
    seen = []
    for _ in range(60):  # Tune's loop steps every second or so; no result comes
        clock[0] += 1
        progress.on_step_begin(0, running)
        seen += capsys.readouterr().out.splitlines()
    assert [line[:9] for line in seen] == [f"[{s:6d}s]" for s in (10, 20, 30, 40, 50, 60)]
    assert seen[-1].endswith("0/2 done, eta -:--:--, 2 running (0 diverged, 0 errored), 0 epochs; leading: none yet")


def test_an_80_column_terminal_shows_the_bar_eta_and_the_whole_status():
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=True)
    bar = StatusBar(console)
    bar.add_task("", total=40, completed=15, trials="3/8")
    bar.status = ("2 running (0 diverged, 1 errored), 14 epochs; leading: val_accuracy 0.9663 (trial e42ace60), "
                  "unique_params 1354 (trial 950de2d6); Pareto front 2")
    console.print(*bar.get_renderables())
    first, *rest = console.export_text().splitlines()
    assert first.split()[0] == "trials" and "3/8" in first and "eta" in first and "━" in first
    assert " ".join(" ".join(rest).split()) == bar.status


def test_the_eta_counts_epochs_so_it_shows_before_the_first_trial_ends(capsys, monkeypatch):
    """A walk's bar read `eta -:--:--` until the search's last redraw: it counted finished trials."""
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress = Progress({"val_accuracy": "max"}, total=2, epochs=4)  # 8 epochs' worth
    progress.setup()
    running = [trial("a"), trial("b")]
    progress.on_step_begin(0, running)
    assert progress.eta() == "-:--:--"  # no epoch yet: no pace
    clock[0] += 10
    for t in running:
        progress.on_trial_result(0, running, t, {STEP: 1, "val_accuracy": 0.5})
    assert progress.work_done() == 2 and progress.eta() == "0:00:30"  # 2 epochs in 10 s: 6 more in 30 s
    running[0].last_result = {STEP: 1, "val_accuracy": 0.5}
    progress.on_trial_complete(0, running, running[0])  # stopped early: its 3 epochs left are work no longer to do
    assert progress.work_done() == 5 and progress.eta() == "0:00:06"
    clock[0] += 10  # off a terminal, a line every 10 s: the trial's end said nothing of its own
    progress.on_step_begin(0, running)
    progress.on_trial_complete(0, running, running[1])
    progress.on_experiment_end(running)  # and the last line, where the search ended
    assert [line[:22] for line in capsys.readouterr().out.splitlines()] == [
        "[    10s] 0/2 done, et", "[    20s] 1/2 done, et", "[    20s] 2/2 done, et"]


def test_the_start_steps_spin_on_a_terminal_are_erased_when_done_and_say_nothing_elsewhere():
    drawn = io.StringIO()
    with StartSteps(Console(file=drawn, force_terminal=True)) as step:
        step("starting a local Ray")
    assert "starting a local Ray…" in drawn.getvalue() and drawn.getvalue().endswith("\x1b[2K")  # the line cleared
    assert terminal_console() is None  # pytest's stdout is no terminal: as in logs and pipes, no spinner nor bar
    with StartSteps(None) as step:
        step("starting a local Ray")
    assert step.spinner is None
