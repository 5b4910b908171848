"""SPIN speed: shared, fused and folded ConvMixers against their baselines, in one process.

    python benchmarks/bench_spin.py [--dim 256 --depth 8 --batch 64]

Rows: train step of the shared model / unshared (target <= 1.02); train step with fusion in
training / unshared (target <= 1.10); inference of the folded model / the shared one (1.00).
Each pair is timed as `timing.compare` does (alternating short blocks, median over pairs), after
`keep_freed_memory`, as in sharetune's training loop.
"""

from __future__ import annotations

import torch
from timing import Step, compare, convmixer_arguments, train_step

from sharetune.models import create_model, fold
from sharetune.training import keep_freed_memory, pick_device


def inference(model: torch.nn.Module, x: torch.Tensor) -> Step:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def main() -> None:
    parser = convmixer_arguments(__doc__.splitlines()[0], seconds=30.0)  # CPU steps take about a second
    parser.add_argument("--block", type=float, default=0.05, help="seconds per block of steps")
    parser.add_argument("--device", default=str(pick_device()))
    args = parser.parse_args()
    keep_freed_memory()  # as sharetune's training loop does, for every model
    arch = dict(dim=args.dim, depth=args.depth, patch_size=2, kernel_size=5, num_classes=10)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    unshared = create_model("convmixer", **arch).to(args.device)
    shared = create_model("convmixer", **arch, sharing={"share_rate": 2}).to(args.device)
    fused = create_model("convmixer", **arch, pretrained=unshared.state_dict(), sharing={"share_rate": 2, "fusion": "channel_weighted_mean"}).to(args.device)
    folded = fold(fused).to(args.device)
    print(f"ConvMixer-{args.dim}/{args.depth} 32x32 batch {args.batch}, device={args.device}, threads={torch.get_num_threads()}")
    rows = [  # steps made when their row runs: each sets its models' train or eval mode
        ("train: shared / unshared", lambda: (train_step(shared, x, y), train_step(unshared, x, y)), "<= 1.02"),
        ("train: fusion / unshared", lambda: (train_step(fused, x, y), train_step(unshared, x, y)), "<= 1.10"),
        ("infer: folded / shared", lambda: (inference(folded, x), inference(shared, x)), "~ 1.00"),
    ]
    for name, steps, target in rows:
        ratio, spread, _ = compare(*steps(), args.device, args.seconds, args.block)
        print(f"{name:28s} {ratio:.3f}  (target {target}; {spread})")


if __name__ == "__main__":
    main()
