"""Train-step time of ArbNet MLPs over their dense twins (same virtual shapes, nn.Linear), one process.

    python benchmarks/bench_arbnet.py [--seconds 4.5] [--block 0.05] [--device cpu|cuda]

Each row times SGD-with-momentum steps (forward, backward, step) of both nets in alternating short
blocks (dense, ArbNet, ArbNet, dense, ...; each block as many steps as fill `--block` seconds of
dense steps, at least one) for about `--seconds` per net, and prints the median over pairs of
blocks of ArbNet's time over the dense twin's, against its target, with the middle half of the
pairs' ratios. On a shared virtual machine the speed drifts by 20-40% within a second: short
blocks make the drift hit both nets alike, and the median drops the pairs a burst of noise hit.
Like sharetune's training loop, it first lets glibc keep freed memory (`keep_freed_memory`), for
both nets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sharetune.models.arbnet import PAPER_MLPS, ArbNetMLP
from sharetune.training import keep_freed_memory

CASES = [
    # name, dataset, batch, ArbNet options, target ratio
    ("mnist dirichlet table=1000", "mnist", 128, dict(hash="dirichlet", alpha=1.0, table_size=1000), 1.10),
    ("cifar10 uniform 10%", "cifar10", 512, dict(hash="uniform", compression=0.1), 1.15),
    ("cifar10 uniform 10%", "cifar10", 128, dict(hash="uniform", compression=0.1), 1.30),
]


def dense_twin(dataset: str) -> nn.Module:
    in_features, hidden, classes = PAPER_MLPS[dataset]
    widths = [in_features, *hidden, classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ELU(), nn.BatchNorm1d(fan_out)]
    return nn.Sequential(*layers)


def step_timer(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run(steps: int) -> float:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        sync()
        return (time.perf_counter() - start) / steps

    return run


def compare(arb, dense, seconds: float, block_seconds: float) -> tuple[list[float], list[float]]:
    """Per pair of blocks: ArbNet time over dense time, and the dense step time."""
    steps = max(1, round(block_seconds / dense(2)))
    pairs = max(9, round(seconds / (steps * dense(steps))))
    ratios, dense_times = [], []
    for i in range(pairs):
        if i % 2:  # alternate the order: whichever runs second never always finds the caches warm
            a, d = arb(steps), dense(steps)
        else:
            d, a = dense(steps), arb(steps)
        ratios.append(a / d)
        dense_times.append(d)
    return ratios, dense_times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.5)
    parser.add_argument("--block", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as sharetune's training loop does, for both nets
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, dataset, batch, options, target in CASES:
        torch.manual_seed(0)
        in_features = PAPER_MLPS[dataset][0]
        x = torch.randn(batch, in_features, device=args.device)
        y = torch.randint(0, 10, (batch,), device=args.device)
        arb = step_timer(ArbNetMLP.paper(dataset, **options).to(args.device), x, y)
        dense = step_timer(dense_twin(dataset).to(args.device), x, y)
        arb(2)  # warm-up: kernel build, allocator, caches
        ratios, dense_times = compare(arb, dense, args.seconds, args.block)
        ratio = statistics.median(ratios)
        low, _, high = statistics.quantiles(ratios, n=4)
        verdict = "ok" if ratio <= target else "OVER"
        print(
            f"{name:28s} batch {batch:4d}: arbnet/dense = {ratio:.3f} (target <= {target:.2f}, {verdict}; "
            f"middle half {low:.2f}-{high:.2f}); dense step {statistics.median(dense_times) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
