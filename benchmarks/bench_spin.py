"""SPIN speed: shared, fused and folded ConvMixers against their baselines, in one process.

    python benchmarks/bench_spin.py [--dim 256 --depth 8 --batch 64]

Rows: train step of the shared model / unshared (target <= 1.02); train step with fusion in
training / unshared (target <= 1.10); inference of the folded model / the shared one (1.00).
Timings are interleaved in rounds and the median ratio is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from sharetune.models import create_model, fold


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def timed(fn: Callable[[], None], steps: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def ratio(candidate: Callable[[], None], baseline: Callable[[], None], steps: int, rounds: int, device: str) -> float:
    candidate(), baseline()
    ratios = []
    for _ in range(rounds):
        base = timed(baseline, steps, device)
        ratios.append(timed(candidate, steps, device) / base)
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    arch = dict(dim=args.dim, depth=args.depth, patch_size=2, kernel_size=5, num_classes=10)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    unshared = create_model("convmixer", **arch).to(args.device)
    shared = create_model("convmixer", **arch, sharing={"rate": 2}).to(args.device)
    fused = create_model("convmixer", **arch, pretrained=unshared.state_dict(), sharing={"rate": 2, "fusion": "channel_weighted_mean"}).to(args.device)
    folded = fold(fused).to(args.device)
    print(f"ConvMixer-{args.dim}/{args.depth} 32x32 batch {args.batch}, device={args.device}, threads={torch.get_num_threads()}")
    rows = [
        ("train: shared / unshared", ratio(train_step(shared, x, y), train_step(unshared, x, y), args.steps, args.rounds, args.device), "<= 1.02"),
        ("train: fusion / unshared", ratio(train_step(fused, x, y), train_step(unshared, x, y), args.steps, args.rounds, args.device), "<= 1.10"),
        ("infer: folded / shared", ratio(inference(folded, x), inference(shared, x), args.steps, args.rounds, args.device), "~ 1.00"),
    ]
    for name, value, target in rows:
        print(f"{name:28s} {value:.3f}  (target {target})")


if __name__ == "__main__":
    main()
