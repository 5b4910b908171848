"""Checkpoint sizes of ArbNet MLPs against their dense twins (torch.save of the state_dict, in bytes).

    python benchmarks/bench_checkpoint.py

An ArbNet layer saves its table, bias and hash recipe; the index is recomputed at load. `values`
counts the unique parameters plus the BatchNorms' running statistics (what must be stored), `ratio`
is the checkpoint over 4 bytes per value, and `with index` what it held when the int32 index was
stored as well.
"""

from __future__ import annotations

import io

import torch
from bench_arbnet import dense_twin

from sharetune.models.arbnet import ArbNetMLP

CASES = [
    # name, dataset, ArbNet options
    ("mnist dirichlet table=1000", "mnist", dict(hash="dirichlet", alpha=1.0, table_size=1000)),
    ("cifar10 uniform table=1000", "cifar10", dict(hash="uniform", table_size=1000)),
    ("cifar10 uniform 10%", "cifar10", dict(hash="uniform", compression=0.1)),
]


def saved_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def main() -> None:
    print(f"{'net':28s} {'unique':>10s} {'values':>10s} {'checkpoint':>11s} {'ratio':>6s} {'with index':>11s} {'dense twin':>11s}")
    for name, dataset, options in CASES:
        model = ArbNetMLP.paper(dataset, **options)
        unique = sum(p.numel() for p in model.parameters())
        values = unique + sum(b.numel() for b in model.buffers() if b.is_floating_point())  # the running stats
        state = model.state_dict()
        indices = {f"{i}.index": layer.index for i, layer in enumerate(model.arb_layers())}
        size = saved_bytes(state)
        print(f"{name:28s} {unique:10,d} {values:10,d} {size:11,d} {size / (4 * values):6.3f} "
              f"{saved_bytes({**state, **indices}):11,d} {saved_bytes(dense_twin(dataset).state_dict()):11,d}")


if __name__ == "__main__":
    main()
