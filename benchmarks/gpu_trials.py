"""Trials on a GPU through the real search: a two-worker DDP trial (both workers on the one GPU when
there is only one), and four trials packed on one GPU (`gpu: 0.25`). Prints what each reported.
Without a GPU the same searches run on CPUs, as a dry run of this script.

    python benchmarks/gpu_trials.py [--storage /tmp/gpu-trials]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_spec  # noqa: E402

from sharetune.search import report, tuner  # noqa: E402
from sharetune.spaces import parse_spec  # noqa: E402

CONVNEXT = {"model": "convnext_isotropic", "dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3, "share_rate": 2,
            "recipe": "arbnet", "lr": 0.05, "batch_size": 64, "epochs": 3}


def search(storage: Path, name: str, **changes) -> Path:
    spec = parse_spec(tiny_spec(**changes))
    result = tuner.run(spec, storage=str(storage), mlflow_uri=f"sqlite:///{storage}/mlflow.db", progress=True, name=name)
    return Path(result.folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, default=Path("/tmp/gpu-trials"))
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    print(f"{gpus} GPU(s): {[torch.cuda.get_device_name(i) for i in range(gpus)]}")
    args.storage.mkdir(parents=True, exist_ok=True)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    per_worker, packed = (1.0 if gpus >= 2 else 0.5, 0.25) if gpus else (0, 0)
    folder = search(args.storage, "ddp", family="spin", fixed=CONVNEXT, dimensions={}, data={"name": "synthetic", "val_fraction": 0},
                    resources={"workers": 2, "cpu": 1, "gpu": per_worker}, budget={"num_samples": 1, "max_concurrent": 1})
    for path in folder.glob("trial_*/result.json"):
        for row in map(json.loads, path.read_text().splitlines()):
            if row.get("world_size"):  # an epoch's record, not the costs known before training
                print("ddp", {k: row[k] for k in ("epoch", "world_size", "rank_samples", "loss", "test_accuracy", "epoch_seconds")})
    folder = search(args.storage, "packed", fixed={"table_size": 256, "epochs": 3, "hidden": [64]},
                    resources={"cpu": 1, "gpu": packed}, budget={"num_samples": 4, "max_concurrent": 4})
    trials = report.trials_from_folder(folder)
    trials = trials[~trials["status"].isin(report.SKIPPED)]  # proposals answered without training
    print(trials[["trial_id", "status", "epochs_done", "test_accuracy"]].to_string())
    pids = {json.loads(line)["pid"] for path in folder.glob("trial_*/result.json") for line in path.read_text().splitlines()}
    print(f"packed: {len(trials)} trials, {int((trials['status'] == 'TERMINATED').sum())} finished, in {len(pids)} "
          f"processes on {'one GPU' if gpus else 'the CPUs'} (Tune hands a finished trial's process to the next one, "
          "so this many ran at once)")


if __name__ == "__main__":
    main()
