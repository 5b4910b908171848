"""Training-loop speed: sharetune's loop against a plain hand-written timm loop, in one process.

    python benchmarks/bench_train.py [--dim 256 --depth 8 --batch 64 --images 256]

Both train the same ConvMixer at 32 px with the SPIN recipe (AdamW, one-cycle, label smoothing,
MixUp/CutMix, random erasing, gradient clipping; RandAugment too on the folder) on the same data,
one epoch per call, then evaluate the same test split: rows for an in-memory set and for an
ImageFolder read through 2 loader workers. Calls alternate as `timing.compare` does; the figure is
sharetune's images per second over the plain loop's (target >= 0.95).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import compare, convmixer_arguments

from sharetune.data import TensorData, load
from sharetune.models import create_model
from sharetune.recipes import Recipe
from sharetune.training import pick_device, train_epochs


def write_folder(root: Path, images: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", 64)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def sharetune_epoch(model, data, recipe: Recipe, workers: int):
    """One call, one epoch of `train_epochs` (training, then evaluation on the test split)."""
    epochs = train_epochs(model, data, recipe, workers=workers)
    return lambda: next(epochs)


def plain_epoch(model, data, recipe: Recipe, workers: int):
    """A hand-written loop with timm's pieces, as a user would write it without sharetune."""
    from timm.data import Mixup, create_transform
    from timm.data.random_erasing import RandomErasing
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from torchvision.datasets import ImageFolder

    steps = data.steps_per_epoch(recipe.batch_size)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=recipe.scaled_lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.scaled_lr, total_steps=10**6 * steps, cycle_momentum=False)
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing, num_classes=data.num_classes)
    criterion = SoftTargetCrossEntropy()
    if isinstance(data, TensorData):
        erase = RandomErasing(recipe.random_erasing, mode="pixel", device="cpu")

        def train_batches(epoch):
            order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(order), recipe.batch_size):
                batch = order[start : start + recipe.batch_size]
                yield erase(data.x_train[batch].clone()), data.y_train[batch]

        def test_batches():
            yield data.x_test, data.y_test
    else:
        train_set = ImageFolder(str(data.root / "train"), create_transform(32, is_training=True, auto_augment=recipe.randaugment,
                                                                           re_prob=recipe.random_erasing, re_mode="pixel"))
        test_set = ImageFolder(str(data.root / "val"), create_transform(32))
        train_loader = torch.utils.data.DataLoader(train_set, recipe.batch_size, shuffle=True, num_workers=workers, persistent_workers=True)
        test_loader = torch.utils.data.DataLoader(test_set, 1024, num_workers=workers, persistent_workers=True)
        train_batches, test_batches = (lambda epoch: iter(train_loader)), (lambda: iter(test_loader))
    epoch = [0]

    def run() -> int:
        model.train()
        for x, y in train_batches(epoch[0]):
            x, y = (x[:-1], y[:-1]) if len(x) % 2 else (x, y)
            x, soft = mixup(x, y)
            loss = criterion(model(x), soft)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_batches())
        epoch[0] += 1
        # the count is the evaluation sharetune's epoch does too; the labels are random, so it has no bound to check
        return correct

    return run


def main() -> None:
    parser = convmixer_arguments(__doc__.splitlines()[0], seconds=60.0)
    parser.add_argument("--images", type=int, default=256, help="training images per epoch (one call)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp16"], help="also time sharetune's loop in this precision against fp32")
    args = parser.parse_args()
    recipe = Recipe(recipe="spin", epochs=10**6, batch_size=args.batch)
    arch = dict(dim=args.dim, depth=args.depth, patch_size=2, kernel_size=5, num_classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        folder = load("imagefolder", write_folder(Path(tmp), args.images), img_size=32, val_fraction=0)  # as plain_epoch
        rng = torch.Generator().manual_seed(0)
        memory = TensorData("memory", torch.randn(args.images, 3, 32, 32, generator=rng), torch.randint(0, 10, (args.images,), generator=rng),
                            torch.randn(64, 3, 32, 32, generator=rng), torch.randint(0, 10, (64,), generator=rng), 10)
        print(f"ConvMixer-{args.dim}/{args.depth} 32x32 batch {args.batch}, {args.images} images an epoch, "
              f"threads={torch.get_num_threads()}, recipe spin")
        for name, data in (("in memory", memory), (f"ImageFolder, {args.workers} workers", folder)):
            torch.manual_seed(0)
            ours, theirs = create_model("convmixer", **arch), create_model("convmixer", **arch)
            ratio, spread, base = compare(sharetune_epoch(ours, data, recipe, args.workers), plain_epoch(theirs, data, recipe, args.workers),
                                          "cpu", args.seconds, block=0.0)
            print(f"{name:28s} sharetune {args.images / (base * ratio):7.1f} img/s, plain {args.images / base:7.1f} img/s: "
                  f"{1 / ratio:.3f} of the plain loop (target >= 0.95; time ratio {spread})")
        if args.precision:  # on the default device (CUDA where present): autocast on against off, in memory
            device = str(pick_device())
            fast, full = create_model("convmixer", **arch), create_model("convmixer", **arch)
            mixed = recipe.model_copy(update={"precision": args.precision})
            ratio, spread, base = compare(sharetune_epoch(fast, memory, mixed, args.workers),
                                          sharetune_epoch(full, memory, recipe.model_copy(update={"precision": "fp32"}), args.workers),
                                          device, args.seconds, block=0.0)
            print(f"{args.precision} / fp32 on {device:6s} sharetune {args.images / (base * ratio):7.1f} img/s against "
                  f"{args.images / base:7.1f} img/s: time ratio {ratio:.3f} ({spread})")


if __name__ == "__main__":
    main()
