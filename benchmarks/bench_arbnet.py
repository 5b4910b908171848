"""Train-step time of ArbNet MLPs over their dense twins (same virtual shapes, nn.Linear), one process.

    python benchmarks/bench_arbnet.py [--seconds 4.5] [--block 0.05] [--device cpu|cuda]

Each row times SGD-with-momentum steps (forward, backward, step) of both nets as `timing.compare`
does (alternating short blocks, median over pairs) and prints the ratio against its target. Like
sharetune's training loop, it first lets glibc keep freed memory (`keep_freed_memory`), for both nets.
"""

from __future__ import annotations

import argparse

import torch
from timing import compare, train_step
from torch import nn

from sharetune.models.arbnet import PAPER_MLPS, ArbNetMLP
from sharetune.training import keep_freed_memory, pick_device

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.5, help="time per net per row")
    parser.add_argument("--block", type=float, default=0.05, help="seconds per block of steps")
    parser.add_argument("--device", default=str(pick_device()))
    args = parser.parse_args()
    keep_freed_memory()  # as sharetune's training loop does, for both nets
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, dataset, batch, options, target in CASES:
        torch.manual_seed(0)
        x = torch.randn(batch, PAPER_MLPS[dataset][0], device=args.device)
        y = torch.randint(0, 10, (batch,), device=args.device)
        arb = train_step(ArbNetMLP.paper(dataset, **options).to(args.device), x, y)
        dense = train_step(dense_twin(dataset).to(args.device), x, y)
        ratio, spread, dense_time = compare(arb, dense, args.device, args.seconds, args.block)
        verdict = "ok" if ratio <= target else "OVER"
        print(
            f"{name:28s} batch {batch:4d}: arbnet/dense = {ratio:.3f} (target <= {target:.2f}, {verdict}; "
            f"{spread}); dense step {dense_time * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
