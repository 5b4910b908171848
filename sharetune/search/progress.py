"""Live progress of a search: a bar with its ETA on a terminal (rich), a line every LINE_EVERY_S seconds
elsewhere (Ray Job logs, pipes); both say trials running/done/diverged/errored, epochs done, the leading
value of each objective (over the trials' latest results, as the summary ranks them) with its trial,
and the size of the Pareto front so far. The ETA counts epochs, not trials, so it shows from the first
epoch on: each planned trial is `epochs` of work, and a trial that ends early (stopped, diverged, fewer
epochs) counts as all of them."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import numpy as np
import optuna
import typer
from ray import tune
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Bar
from rich.text import Text

from sharetune.metrics import STEP, pareto_mask
from sharetune.search.outcome import FAILED, FINISHED, trial_error
from sharetune.text import number, plural

NOISY_LOGGERS = ("mlflow", "alembic", "ray._private.authentication", "ray.tune", "ray.train")
TUNE_RUN_LOGGER = "ray.tune.tune"  # where Tune's fit logs its end
LINE_EVERY_S = 10.0  # off a terminal (Ray Job logs, pipes): the seconds between two progress lines


def quiet() -> None:
    """Silence what Ray, Optuna and MLflow print while starting (banners, Tune's configuration box and
    TensorBoard hint, study and database creation); `--verbose` skips this."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter, silent at verbose=0
    # A failed trial gets one line from Progress (its error.txt holds the traceback), not Tune's traceback
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # Ray's copy of the same error, from the worker
    # MLflow's two "View run ... at" lines for each run it ends on a tracking server; the search links its parent run
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # The search's last line says how many trials failed and the first one's error; Tune's list of their names adds nothing
    logging.getLogger(TUNE_RUN_LOGGER).addFilter(lambda record: not record.getMessage().startswith("Trials did not complete"))


def terminal_console() -> Console | None:
    """Where the live displays (the start's spinner, the bar) draw: stdout when it is a user's terminal;
    None in logs and pipes, which get lines instead."""
    return Console() if sys.stdout.isatty() else None


class StartSteps:
    """What a search does before Tune starts its trials (loading the data, the dry runs, starting Ray:
    seconds to minutes), as a spinner on `console` until the bar takes over; nothing without one, where
    the slow steps print their own lines. Use as a context: `step("loading mnist")`."""

    def __init__(self, console: Console | None) -> None:
        self.spinner = console.status("starting") if console is not None else None

    def __enter__(self) -> StartSteps:
        return self

    def __call__(self, step: str) -> None:
        if self.spinner is not None:
            self.spinner.start()  # once started, again does nothing
            self.spinner.update(f"{step}…")

    def __exit__(self, *exc_info) -> None:
        if self.spinner is not None:
            self.spinner.stop()


class StatusBar(Bar):
    """The trials' bar, count, elapsed time and ETA on one line, and the search's status on the next:
    in one row, a long status squeezed the bar and the ETA out of an 80-column terminal."""

    def __init__(self, console: Console) -> None:
        self.status = ""
        super().__init__(TextColumn("[bold]trials"), BarColumn(), TextColumn("{task.fields[trials]}"), TimeElapsedColumn(),
                         TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield Text(self.status)


class Progress(tune.Callback):
    def __init__(self, objectives: dict[str, str], total: int, epochs: int) -> None:
        """`total`: the trials the search expects to train; `epochs`: the most one trains."""
        self.objectives, self.total, self.trial_epochs = objectives, total, epochs
        self.latest: dict[str, list[float]] = {}  # trial id -> its objectives at its last epoch (not failed nor diverged)
        self.steps: dict[str, int] = {}  # trial id -> its epochs so far
        self.started = self.last = time.monotonic()
        self.work_at_start = 0  # epochs' worth done when this run of the search started (a resumed one's earlier)
        self.epochs = self.diverged = 0
        # trial id -> "done" | "error", as Tune reports them: it updates a status after the callbacks, and its
        # clean-up after Ctrl-C or the time limit marks the running trials TERMINATED without completing them
        self.ended: dict[str, str] = {}
        self.bar: StatusBar | None = None

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its state; the live display stays here
        return {**self.__dict__, "bar": None}

    def __setstate__(self, state: dict) -> None:
        """A search an earlier version started pickled its callback without the epochs' count (its ETA
        then counts each trial as one epoch)."""
        self.__dict__.update({"trial_epochs": 1, "steps": {}, "work_at_start": 0, **state})

    def setup(self, **info) -> None:
        """Also where a resumed search starts: Tune restores this callback as the search first pickled it,
        so the clock restarts here and the trials' earlier epochs are counted at the first step."""
        self.started = self.last = time.monotonic()
        self.caught_up = False
        console = terminal_console()
        if console is not None:
            self.bar = StatusBar(console)
            self.bar.add_task("", total=self.work_planned(), trials=self.counted())
            self.bar.start()

    def status(self, trials) -> str:
        running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
        errored = sum(t.status == FAILED or self.ended.get(t.trial_id) == "error" for t in trials)
        best = ", ".join(f"{name} {number(value)} (trial {trial})" for name, (value, trial) in self.best().items()) or "none yet"
        front = f"; Pareto front {self.front_size()}" if len(self.objectives) > 1 else ""
        return (f"{running} running ({self.diverged} diverged, {errored} errored), {plural(self.epochs, 'epoch')}; "
                f"leading: {best}{front}")

    def best(self) -> dict[str, tuple[float, str]]:
        """Objective -> (value, trial id): the best of the trials' latest values (a trial's value may fall
        from one epoch to the next: the summary, too, ranks trials by their last epoch)."""
        found: dict[str, tuple[float, str]] = {}
        for trial_id, values in self.latest.items():
            for (name, mode), value in zip(self.objectives.items(), values):
                if name not in found or (value > found[name][0] if mode == "max" else value < found[name][0]):
                    found[name] = (value, trial_id)
        return found

    def done(self) -> int:
        return len(self.ended)

    def counted(self) -> str:
        """Trials ended of those expected, `3/8`."""
        return f"{self.done()}/{self.total}"

    def work_planned(self) -> int:
        """Epochs' worth of work in the trials expected."""
        return self.total * self.trial_epochs

    def work_done(self) -> int:
        """Epochs' worth of the planned work done: an ended trial counts all its epochs (the most a trial trains)."""
        return sum(self.trial_epochs if trial_id in self.ended else min(self.steps.get(trial_id, 0), self.trial_epochs)
                   for trial_id in {*self.steps, *self.ended})

    def eta(self) -> str:
        """The time left at this run's pace so far, as `0:02:10`; `-:--:--` before its first epoch."""
        done = self.work_done()
        pace = (done - self.work_at_start) / max(time.monotonic() - self.started, 1e-9)
        if pace <= 0:
            return "-:--:--"
        left = max(self.work_planned() - done, 0) / pace
        return f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    def front_size(self) -> int:
        if not self.latest:
            return 0
        points = np.array(list(self.latest.values()))
        return int(pareto_mask(points, [mode == "max" for mode in self.objectives.values()]).sum())

    def show(self, trials, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.status = self.status(trials)
            self.bar.update(self.bar.task_ids[0], completed=self.work_done(), trials=self.counted())
        elif force or time.monotonic() - self.last >= LINE_EVERY_S:
            self.last = time.monotonic()
            elapsed = time.monotonic() - self.started
            typer.echo(f"[{elapsed:6.0f}s] {self.counted()} done, eta {self.eta()}, {self.status(trials)}")

    def _catch_up(self, trials) -> None:
        """A resumed search's trials, as far as they got before: at its first step, or at its end where
        it had none (a finished search's resume, whose line said `0/6 done` and nothing leading)."""
        if self.caught_up:
            return
        self.caught_up = True
        self.epochs = self.diverged = 0
        self.latest, self.ended, self.steps = {}, {}, {}
        for trial in trials:
            last = trial.last_result or {}
            self.epochs += int(last.get(STEP, 0))
            self.steps[trial.trial_id] = int(last.get(STEP, 0))
            self.diverged += bool(last.get("diverged"))
            values = self._counted(last)
            if trial.status != FAILED and values is not None:
                self.latest[trial.trial_id] = values
            if trial.status in (FINISHED, FAILED):
                self.ended[trial.trial_id] = "done" if trial.status == FINISHED else "error"
        self.work_at_start = self.work_done()
        if self.bar is not None:  # from there: the bar's pace counts this run's epochs alone
            self.bar.reset(self.bar.task_ids[0], completed=self.work_at_start, trials=self.counted())

    def on_step_begin(self, iteration, trials, **info) -> None:
        self._catch_up(trials)
        if self.bar is None:  # a line every LINE_EVERY_S off a terminal, through epochs that report nothing for long
            self.show(trials)  # (a terminal's bar keeps its clock itself; its status changes with results)

    def _counted(self, result: dict) -> list[float] | None:
        """A result's objectives, where they count toward the best: an epoch's, finite, not diverged."""
        values = [result.get(name) for name in self.objectives]
        if result.get(STEP, 0) >= 1 and not result.get("diverged") and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return values
        return None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(STEP, 0) >= 1:
            self.epochs += 1
            self.steps[trial.trial_id] = int(result[STEP])
        values = self._counted(result)
        if values is not None:
            self.latest[trial.trial_id] = values
        self.show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        diverged = bool((trial.last_result or {}).get("diverged"))
        self.diverged += diverged
        if diverged:
            self.latest.pop(trial.trial_id, None)
        self.ended[trial.trial_id] = "done"
        self.show(trials)  # off a terminal, a line per ended trial was 80 lines in 20 s of short trials

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = "error"
        self.latest.pop(trial.trial_id, None)  # a failed trial is no one's best, nor on the front
        message = f"trial {trial.trial_id} failed; the search goes on: {trial_error(trial)}"
        (self.bar.console.print if self.bar is not None else typer.echo)(message)
        self.show(trials, force=True)

    def on_experiment_end(self, trials, **info) -> None:
        self._catch_up(trials)
        self.show(trials, force=True)  # off a terminal, where the search ended: the last line says
        if self.bar is not None:
            self.bar.stop()
