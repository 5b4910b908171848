"""The live progress of a search: what its status says as trials report, fail and diverge, and the bar
as an 80-column terminal shows it."""

import io
from types import SimpleNamespace

from rich.console import Console

from sharetune.metrics import STEP
from sharetune.search.progress import Progress, StatusBar


def trial(trial_id: str, status: str = "RUNNING") -> SimpleNamespace:
    """What Progress reads of a Tune trial (a failed one's error comes from get_error)."""
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={}, error_file=None,
                           get_error=lambda: "ValueError: table_size: 0 is too small")


def test_the_status_names_the_best_trial_and_forgets_one_that_fails(capsys):
    progress = Progress({"val_accuracy": "max", "unique_params": "min"}, total=4)
    trials = [trial("a"), trial("b"), trial("c")]
    for t, accuracy, params in [(trials[0], 0.9, 500), (trials[1], 0.7, 100), (trials[2], 0.5, 900)]:
        progress.on_trial_result(0, trials, t, {STEP: 1, "val_accuracy": accuracy, "unique_params": params})
    assert progress.status(trials).endswith("best: val_accuracy 0.9 (trial a), unique_params 100 (trial b); Pareto front 2")
    progress.on_trial_error(0, trials, trials[0])
    assert "trial a failed; the search goes on: ValueError: table_size: 0 is too small" in capsys.readouterr().out
    assert progress.status(trials) == ("2 running (0 diverged, 1 errored), 3 epochs; "
                                       "best: val_accuracy 0.7 (trial b), unique_params 100 (trial b); Pareto front 1")


def test_an_80_column_terminal_shows_the_bar_eta_and_the_whole_status():
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=True)
    bar = StatusBar(console)
    bar.add_task("", total=8, completed=3)
    bar.status = ("2 running (0 diverged, 1 errored), 14 epochs; best: val_accuracy 0.9663 (trial e42ace60), "
                  "unique_params 1354 (trial 950de2d6); Pareto front 2")
    console.print(*bar.get_renderables())
    first, *rest = console.export_text().splitlines()
    assert first.split()[0] == "trials" and "3/8" in first and "eta" in first and "━" in first
    assert " ".join(" ".join(rest).split()) == bar.status
