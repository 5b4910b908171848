"""How both benchmarks time a candidate against its baseline in one process.

On a shared virtual machine the speed drifts by 20-40% within a second. So the two run in
alternating short blocks (baseline, candidate, candidate, baseline, ...), each block as many calls
as fill `block` seconds of the baseline (at least one), for about `seconds` per side, and the
result is the median over pairs of blocks of candidate time over baseline time: the drift hits
both alike, and the median drops the pairs a burst of noise hit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

Step = Callable[[], None]


def convmixer_arguments(description: str | None, seconds: float) -> argparse.ArgumentParser:
    """The options the ConvMixer benchmarks share: the model, the batch, the time per side."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=seconds, help="time per model per row")
    return parser


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One SGD-with-momentum step: forward, backward, update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timer(step: Step, device: str) -> Callable[[int], float]:
    """`run(n)`: seconds per call over n calls of `step`, the device's queue drained at both ends."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        return (time.perf_counter() - start) / calls

    return run


def compare(candidate: Step, baseline: Step, device: str, seconds: float, block: float) -> tuple[float, str, float]:
    """(median ratio, its spread as text, median baseline seconds per call)."""
    cand, base = timer(candidate, device), timer(baseline, device)
    cand(2), base(2)  # warm-up: kernel builds, allocator, caches
    calls = max(1, round(block / base(2)))
    pairs = max(9, round(seconds / (calls * base(calls))))
    ratios, base_times = [], []
    for i in range(pairs):
        if i % 2:  # alternate the order: neither side always runs second, after the other warmed the caches
            c, b = cand(calls), base(calls)
        else:
            b, c = base(calls), cand(calls)
        ratios.append(c / b)
        base_times.append(b)
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), f"middle half {low:.2f}-{high:.2f}", statistics.median(base_times)
