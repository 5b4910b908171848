"""What writing whole files costs Tune: its sync of a staging folder, and a checkpoint upload, through
the search folder's filesystem against pyarrow's local one, timed in alternating blocks.

    python benchmarks/bench_storage.py

The staging folder is what Tune copies every few seconds: its state (100 KB) and, for each of 16
trials, a result log of 30 epochs and its parameters. The checkpoint is one file of 9 MB (the
largest ArbNet net's, see bench_checkpoint.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pyarrow import fs
from timing import compare

from sharetune.storage_filesystem import tune_storage


def staging_folder(root: Path) -> Path:
    staging = root / "staging"
    staging.mkdir()
    (staging / "experiment_state-2026.json").write_text("x" * 100_000)
    for trial in range(16):
        folder = staging / f"trial_{trial:08x}"
        folder.mkdir()
        rows = (json.dumps({"epoch": epoch, "val_accuracy": 0.5, "pad": "x" * 900}) for epoch in range(30))
        (folder / "result.json").write_text("\n".join(rows) + "\n")
        (folder / "params.json").write_text(json.dumps({"table_size": 64, "hidden": [16]}))
    return staging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per side per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        staging = staging_folder(root)
        checkpoint = root / "trial.pt"
        checkpoint.write_bytes(bytes(9 * 2**20))
        storage = tune_storage(str(root / "search"))
        whole, plain = storage["storage_filesystem"], fs.LocalFileSystem()
        whole.create_dir(f"{root}/search", recursive=True)

        def copier(source: Path, filesystem: fs.FileSystem):
            return lambda: fs.copy_files(str(source), f"{root}/search/{source.name}", destination_filesystem=filesystem)

        print(f"{'what Tune writes':34s} {'pyarrow local':>14s} {'whole files':>12s}")
        for name, source in (("sync of the staging folder", staging), ("checkpoint upload (9 MB)", checkpoint)):
            ratio, spread, base = compare(copier(source, whole), copier(source, plain), "cpu", args.seconds, block=0.2)
            print(f"{name:34s} {base * 1e3:11.1f} ms {ratio:11.2f}x  ({spread})")


if __name__ == "__main__":
    main()
