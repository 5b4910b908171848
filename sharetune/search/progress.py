"""One line of live progress: trials running and done, and the best value of each objective so far."""

from __future__ import annotations

import math
import time

import typer
from ray import tune


class Progress(tune.Callback):
    def __init__(self, objectives: dict[str, str], total: int, every_s: float = 10.0) -> None:
        self.objectives, self.total, self.every_s = objectives, total, every_s
        self.best: dict[str, float] = {}
        self.started = self.last = time.monotonic()
        self.diverged = 0
        self.ended: dict[str, str] = {}  # trial id -> "done" | "error" (Tune updates status after callbacks)

    def _line(self, trials) -> str:
        running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
        done = sum(t.status in ("TERMINATED", "ERROR") or t.trial_id in self.ended for t in trials)
        errored = sum(t.status == "ERROR" or self.ended.get(t.trial_id) == "error" for t in trials)
        best = ", ".join(f"{k} {v:.4g}" for k, v in self.best.items()) or "none yet"
        elapsed = time.monotonic() - self.started
        return (f"[{elapsed:6.0f}s] {running} running, {done}/{self.total} done "
                f"({self.diverged} diverged, {errored} errored); best: {best}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        for name, mode in self.objectives.items():
            value = result.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value) and not result.get("diverged"):
                better = max if mode == "max" else min
                self.best[name] = better(value, self.best.get(name, value))
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            typer.echo(self._line(trials))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.diverged += bool((trial.last_result or {}).get("diverged"))
        self.ended[trial.trial_id] = "done"
        typer.echo(self._line(trials))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = "error"
        typer.echo(f"trial {trial} failed; the search goes on ({trial.error_file or 'see its log'})")
        typer.echo(self._line(trials))
