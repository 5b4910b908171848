"""Many small trials per GPU: aggregate training throughput of k ArbNet MNIST trials sharing one device.

    python benchmarks/bench_packing.py [--counts 1 2 4 8 --seconds 20]

Each of k processes trains the paper's MNIST ArbNet (784-200-200-10, dirichlet hash, 1000-entry
tables, batch 128, the arbnet recipe's SGD) on MNIST-shaped tensors on the same GPU, as k trials with
`resources: {gpu: 1/k}` do. All start together; each counts its steps in the same window after a
warm-up. The row is the k processes' images per second together over one process alone, measured in
the same run: packing pays while it grows with k and stops paying where it flattens.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from multiprocessing.synchronize import Barrier

import torch
import torch.nn.functional as F

READY_S = 120  # a process that fails to start breaks the barrier for the others instead of hanging them


def trial(ready: Barrier, warmup: float, seconds: float, batch: int, device: str, out) -> None:
    from sharetune.models.arbnet import ArbNetMLP
    from sharetune.training import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    model = ArbNetMLP(784, (200, 200), 10, hash="dirichlet", alpha=1.0, table_size=1000).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(60 * batch, 784, device=device), torch.randint(0, 10, (60 * batch,), device=device)
    ready.wait(timeout=READY_S)  # every process has imported torch and built its model: all start together
    steps, counting, begin = 0, False, time.time() + warmup  # the warm-up builds kernels and fills caches
    while True:
        for start in range(0, len(x), batch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[start : start + batch]), y[start : start + batch]).backward()
            optimizer.step()
            steps += counting
        torch.cuda.synchronize() if device == "cuda" else None
        now = time.time()
        if not counting and now >= begin:
            counting, steps, begin = True, 0, now
        elif counting and now - begin >= seconds:
            out.put(steps * batch / (now - begin))
            return


def aggregate(count: int, args: argparse.Namespace) -> float:
    context = mp.get_context("spawn")
    out = context.Queue()
    ready = context.Barrier(count)
    processes = [context.Process(target=trial, args=(ready, args.warmup, args.seconds, args.batch, args.device, out))
                 for _ in range(count)]
    for p in processes:
        p.start()
    rates = [out.get(timeout=300) for _ in processes]
    for p in processes:
        p.join()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per count")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"ArbNet MNIST batch {args.batch}, packed trials on one {name}")
    alone = None
    for count in args.counts:
        rate = aggregate(count, args)
        alone = alone or rate
        print(f"{count} trial(s): {rate:10.0f} img/s together, {rate / alone:5.2f}x one trial alone")


if __name__ == "__main__":
    main()
