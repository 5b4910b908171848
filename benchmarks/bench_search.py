"""Searches that spend less, measured on one real problem: the `weight-sharing` preset on MNIST.

    python benchmarks/bench_search.py [--part share|hypervolume|both] [--data-root data]

`share`: the demo search as `make demo` runs it (16 trials of 3 epochs, 2 at a time). Between the
first trial's start and the last one's end (their MLflow runs' times), how much of the cores the
trials hold went to training (each epoch's own time, `epoch_seconds`), and where the rest went:
setting a trial up before its first epoch, checkpoints and reports between epochs, and the time no
trial function ran (Tune's bookkeeping, actors starting). Target: training >= 0.85.

`hypervolume`: the same problem at a smaller scale (6,000 training images, 600 of them the val
split, and 2,000 test images; 9 epochs a full trial), three search seeds each of random search, NSGA-II, NSGA-II + moasha and
multi-objective TPE + moasha, all with 16 configurations (`--methods`, `--configurations`, `--epochs`:
fewer methods, more configurations, shorter trials: samplers are compared best on many short ones;
`nsga2-sbx`, NSGA-II with simulated binary crossover, on request; `--seeds`). Hypervolume of val accuracy against unique parameters, from the fixed reference (accuracy 0, the dense net's parameters), after every epoch
any trial finishes (MLflow's metric times order them), against the epochs spent so far. Targets:
moasha reaches >= 0.98 of full-budget NSGA-II's final hypervolume with <= 0.4 of its epochs;
NSGA-II beats random at equal epochs (also printed paired by seed, with its standard error). The curves go to a PNG beside the printed table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import ray
from mlflow.tracking import MlflowClient

from sharetune.analysis.figures import save_figure
from sharetune.data import fetch
from sharetune.metrics import hypervolume
from sharetune.search import report, tuner
from sharetune.search.mlflow_queue import TRIAL_TAG, child_runs, search_parent
from sharetune.spaces import load_spec

PRESET = "weight-sharing"
DENSE_PARAMS = "virtual_params"
METHODS = {  # name -> --set overrides on the preset
    "random": ["sampler=random", "sampler_options={}"],
    "nsga2": [],
    "nsga2-sbx": ["sampler_options={population_size: 8, crossover: sbx}"],  # Deb's crossover, not the preset's
    "nsga2-moasha": ["scheduler={name: moasha, grace_period: 1, reduction_factor: 3}"],
    "motpe-moasha": ["sampler=motpe", "sampler_options={}", "scheduler={name: moasha, grace_period: 1, reduction_factor: 3}"],
}
TARGET_SHARE = 0.98  # of full-budget NSGA-II's final hypervolume, the level early stopping should reach
SMALL = ["data.train_subset=6000", "data.test_subset=2000", "budget.max_concurrent=2"]


@dataclass
class Curve:
    epochs: np.ndarray  # epochs spent when each point was reached
    hypervolume: np.ndarray

    def at(self, epochs: float) -> float:
        """The hypervolume reached once `epochs` were spent."""
        reached = self.hypervolume[self.epochs <= epochs]
        return float(reached[-1]) if len(reached) else 0.0

    def epochs_to(self, hypervolume: float) -> float:
        """The epochs spent when the search first reached `hypervolume` (inf: it never did)."""
        reached = self.epochs[self.hypervolume >= hypervolume]
        return float(reached[0]) if len(reached) else math.inf


def run_search(overrides: list[str], storage: Path, name: str):
    spec = load_spec(PRESET, overrides)
    return tuner.run(spec, storage=storage, mlflow_uri=f"sqlite:///{storage}/mlflow.db", name=name, progress=False)


def trained_runs(result) -> list:
    client = MlflowClient(result.mlflow_uri)
    experiment = client.get_experiment_by_name(result.spec.name).experiment_id
    runs = child_runs(client, experiment, search_parent(client, experiment, result.folder).info.run_id)
    return [r for r in runs if TRIAL_TAG in r.data.tags]  # trained trials, not skipped proposals


def training_share(data_root: Path, storage: Path) -> None:
    result = run_search([f"data.root={data_root}"], storage, "share")
    runs = trained_runs(result)
    trials = report.trials_from_folder(result.folder)
    trials = trials[trials["trial_id"].notna()]
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    cores = result.spec.budget.max_concurrent * result.spec.resources.cpu
    held = span * cores
    rows = {"training (epochs)": 0.0, "set-up before the first epoch": 0.0, "checkpoints and reports": 0.0}
    functions = 0.0
    for trial_id in trials["trial_id"]:
        results = result.folder.trial_results(trial_id)
        rows["set-up before the first epoch"] += results[0]["time_this_iter_s"]
        for row in results[1:]:
            rows["training (epochs)"] += row["epoch_seconds"]
            rows["checkpoints and reports"] += row["time_this_iter_s"] - row["epoch_seconds"]
        functions += results[-1]["time_total_s"]
    rows["outside trial functions (Tune, actors, idle)"] = held - functions
    print(f"\n{PRESET} on MNIST: {len(trials)} trials, {cores:g} cores held for {span:.1f} s = {held:.1f} core-seconds")
    for what, seconds in rows.items():
        print(f"  {what:45s} {seconds:7.1f} s  {seconds / held:6.1%}")
    print(f"training share: {rows['training (epochs)'] / held:.3f} (target >= 0.85)")


def curve(result) -> tuple[Curve, int]:
    """Hypervolume after each epoch any trial reported, in the order MLflow received them."""
    client = MlflowClient(result.mlflow_uri)
    events, params, dense = [], {}, 0
    for run in trained_runs(result):
        params[run.info.run_id] = run.data.metrics["unique_params"]
        dense = max(dense, run.data.metrics[DENSE_PARAMS])
        events += [(m.timestamp, m.step, run.info.run_id, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    latest: dict[str, float] = {}
    spent, volumes = [], []
    for _, _, run_id, value in sorted(events):
        latest[run_id] = value
        points = np.array([[accuracy, params[r]] for r, accuracy in latest.items()])
        spent.append(len(spent) + 1)
        volumes.append(hypervolume(points, [True, False], (0.0, dense)) / dense)
    return Curve(np.array(spent), np.array(volumes)), len(events)


def hypervolumes(data_root: Path, storage: Path, seeds: int, methods: list[str], configurations: int, epochs: int) -> None:
    curves: dict[str, list[Curve]] = {name: [] for name in methods}
    for seed in range(seeds):
        for name in methods:
            result = run_search([f"data.root={data_root}", f"seed={seed}", *SMALL, f"fixed.epochs={epochs}",
                                 f"budget.num_samples={configurations}", *METHODS[name]], storage, f"{name}-{seed}")
            found, spent = curve(result)
            curves[name].append(found)
            print(f"{name:14s} seed {seed}: {spent:4d} epochs, hypervolume {found.hypervolume[-1]:.4f}", flush=True)
    full = statistics.mean(c.hypervolume[-1] for c in curves["nsga2"])
    full_epochs = statistics.mean(float(c.epochs[-1]) for c in curves["nsga2"])
    target = TARGET_SHARE * full
    print(f"\n{'method':14s} {'epochs':>7s} {'of nsga2':>8s} {'hypervolume':>11s} {'of nsga2':>8s} "
          f"{f'epochs to {TARGET_SHARE} of nsga2':>24s} {'of nsga2':>8s}   (means over {seeds} seeds)")
    for name, found in curves.items():
        spent = statistics.mean(float(c.epochs[-1]) for c in found)
        volume = statistics.mean(c.hypervolume[-1] for c in found)
        to_target = statistics.mean(c.epochs_to(target) for c in found)
        print(f"{name:14s} {spent:7.1f} {spent / full_epochs:8.3f} {volume:11.4f} {volume / full:8.3f} "
              f"{to_target:24.1f} {to_target / full_epochs:8.3f}")
    if "random" in curves:
        for budget in (full_epochs / 4, full_epochs / 2, full_epochs):
            nsga2 = statistics.mean(c.at(budget) for c in curves["nsga2"])
            random = statistics.mean(c.at(budget) for c in curves["random"])
            print(f"at {budget:5.0f} epochs: nsga2 {nsga2:.4f}, random {random:.4f}, ratio {nsga2 / random if random else math.nan:.3f}")
        for name in (m for m in curves if m.startswith("nsga2") and "moasha" not in m):
            # Paired by seed: both samplers start from the same random first generation.
            gains = [a.at(full_epochs) - b.at(full_epochs) for a, b in zip(curves[name], curves["random"])]
            spread = statistics.stdev(gains) / math.sqrt(seeds) if seeds > 1 else math.nan
            print(f"{name} - random at {full_epochs:.0f} epochs, paired by seed: {statistics.mean(gains):+.4f} "
                  f"(standard error {spread:.4f}); ahead in {sum(g > 0 for g in gains)} of {seeds} seeds")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, found) in enumerate(curves.items()):
        for j, c in enumerate(found):
            ax.step(c.epochs, c.hypervolume, where="post", color=f"C{i}", alpha=0.7, label=name if j == 0 else None)
    ax.set(xlabel="training epochs spent", ylabel="hypervolume (val accuracy, unique params)",
           title=f"{PRESET} on MNIST (6k images, {epochs} epochs a trial)\n{configurations} configurations, {seeds} seeds each")
    ax.legend()
    plot = Path("reports") / "bench_search_hypervolume.png"
    plot.parent.mkdir(exist_ok=True)
    save_figure(fig, plot)
    print(f"curves: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["share", "hypervolume", "both"], default="both")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["random", "nsga2-moasha", "motpe-moasha"],
                        help="hypervolume part: which searches (nsga2, the yardstick, is always run)")
    parser.add_argument("--configurations", type=int, default=16, help="hypervolume part: configurations a search")
    parser.add_argument("--epochs", type=int, default=9, help="hypervolume part: epochs a full trial")
    args = parser.parse_args()
    methods = ["nsga2", *(m for m in args.methods if m != "nsga2")]
    fetch("mnist", args.data_root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as storage:
        if args.part in ("share", "both"):
            training_share(args.data_root.resolve(), Path(storage))
        if args.part in ("hypervolume", "both"):
            hypervolumes(args.data_root.resolve(), Path(storage), args.seeds, methods, args.configurations, args.epochs)


if __name__ == "__main__":
    main()
