"""The GPU check runs once, in the few minutes a lent GPU allows: its search script must work before then."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_trials_script_runs_both_searches_on_cpus(tmp_path):
    """Without a GPU, `gpu_trials.py` runs the same two searches on CPUs: the two-worker trial's every
    epoch comes from both ranks, and the four packed trials all finish."""
    storage = tmp_path / "not-yet-made"
    run = subprocess.run([sys.executable, "benchmarks/gpu_trials.py", "--storage", str(storage)], cwd=ROOT,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    epochs = [ast.literal_eval(line.removeprefix("ddp ")) for line in run.stdout.splitlines() if line.startswith("ddp ")]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert all(row["world_size"] == 2 and row["rank_samples"] == [256, 256] for row in epochs)
    assert "packed: 4 trials, 4 finished, in " in run.stdout
