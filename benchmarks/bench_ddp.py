"""What Ray Train's report poll costs a trial on several workers with short epochs: a two-worker trial
(DDP, gloo on CPU) of a tiny isotropic ConvNeXt, with sharetune's poll (`REPORT_POLL_S`) against Ray
Train's default (2 s), in alternating searches of one process.

    python benchmarks/bench_ddp.py [--rounds 2] [--epochs 10]

Ray Train's controller collects a worker's report when it polls the workers, and a worker's next
report waits until its last one is collected. An epoch's wall time here is the gap between two
reports (Tune's `time_total_s`); `epoch_seconds` is the training loop's own time in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import ray

from sharetune.search import tuner
from sharetune.spaces import parse_spec
from sharetune.trainables.distributed import REPORT_POLL_S, REPORT_POLL_VARIABLE

RAY_DEFAULT_POLL_S = 2.0


def spec(epochs: int) -> dict:
    return {"name": "ddp", "family": "spin", "data": {"name": "synthetic", "val_fraction": 0},
            "fixed": {"model": "convnext_isotropic", "dim": 8, "depth": 2, "patch_size": 2, "kernel_size": 3,
                      "recipe": "arbnet", "lr": 0.05, "batch_size": 64, "epochs": epochs},
            "objectives": {"test_accuracy": "max"}, "resources": {"workers": 2, "cpu": 1},
            "budget": {"num_samples": 1, "max_concurrent": 1}}


def epoch_times(poll_s: float | None, epochs: int, root: Path) -> tuple[float, float]:
    """Median wall time between two epochs' reports and median `epoch_seconds` of one two-worker trial,
    with Ray Train polling every `poll_s` (None: sharetune's setting)."""
    root.mkdir()
    os.environ.pop(REPORT_POLL_VARIABLE, None)
    if poll_s is not None:
        os.environ[REPORT_POLL_VARIABLE] = str(poll_s)  # the Ray started next hands it to its workers
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        search = tuner.run(parse_spec(spec(epochs)), storage=str(root), mlflow_uri=f"sqlite:///{root}/mlflow.db",
                           progress=False)
    finally:
        ray.shutdown()
        os.environ.pop(REPORT_POLL_VARIABLE, None)
    (log,) = Path(search.folder).glob("trial_*/result.json")
    rows = [row for row in map(json.loads, log.read_text().splitlines()) if row["epoch"] > 0]
    gaps = [later["time_total_s"] - earlier["time_total_s"] for earlier, later in zip(rows, rows[1:])]
    return statistics.median(gaps), statistics.median(row["epoch_seconds"] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="searches per side, alternated")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    measured: dict[str, list[tuple[float, float]]] = {"ray default": [], "sharetune": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for side, poll_s in (("ray default", RAY_DEFAULT_POLL_S), ("sharetune", None)):
                measured[side].append(epoch_times(poll_s, args.epochs, Path(scratch) / f"{side}-{round_}".replace(" ", "-")))
    print(f"two-worker trial, {args.epochs} epochs of 512 examples; median over epochs, then over {args.rounds} searches")
    wall = {}
    for side, runs in measured.items():
        wall[side] = statistics.median(gap for gap, _ in runs)
        poll = RAY_DEFAULT_POLL_S if side == "ray default" else REPORT_POLL_S
        print(f"{side:12s} poll {poll:.1f} s: {wall[side]:.3f} s an epoch, training {statistics.median(t for _, t in runs):.3f} s "
              f"(searches: {', '.join(f'{gap:.3f}' for gap, _ in runs)})")
    print(f"sharetune / ray default: {wall['sharetune'] / wall['ray default']:.3f} of the epoch time")


if __name__ == "__main__":
    main()
