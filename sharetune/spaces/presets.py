"""Paper experiments as named specs, each at a reduced (laptop) scale with a `full` (cluster) scale.

A preset file is a spec plus `scales: {full: {...}}`, the changes that restore the paper's scale.
"""

from __future__ import annotations

import os
from pathlib import Path

from sharetune.spaces.documents import load_yaml
from sharetune.spaces.spec import SearchSpec, SpecError, apply_overrides, parse_spec, read_spec_file
from sharetune.spaces.suggest import did_you_mean

PRESET_DIR = Path(__file__).parent / "presets"
SCALES = ("reduced", "full")
DEFAULT_SCALE = SCALES[0]  # runs on a laptop


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset(name: str, scale: str = DEFAULT_SCALE) -> dict:
    """The preset's spec as a dict, at `scale`."""
    if name not in preset_names():
        raise SpecError(f"preset: unknown preset {name!r}; {did_you_mean(name, preset_names())}allowed: "
                        f"{', '.join(preset_names())}")
    if scale not in SCALES:
        raise SpecError(f"scale: unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    raw = read_spec_file(PRESET_DIR / f"{name}.yaml")
    changes = raw.pop("scales", {}).get(scale, {})
    for key, value in changes.items():
        replace = key == "variants" or not isinstance(value, dict)  # dimensions merge one level: each is replaced whole
        raw[key] = value if replace else {**raw.get(key, {}), **value}
    return raw


def load_spec(source: str | Path, overrides: list[str] = (), scale: str = DEFAULT_SCALE) -> SearchSpec:
    """A spec from a YAML file, a preset name, or `env:NAME` (YAML in an environment variable, which
    is how a submitted Ray Job receives it), with `--set key=value` overrides applied."""
    path, is_preset = Path(source), False
    if str(source).startswith("env:"):
        variable = str(source)[4:]
        if not variable or variable not in os.environ:
            raise SpecError(f"spec: environment variable {variable} is not set" if variable else
                            "spec: env: needs a variable's name, e.g. env:SPEC")
        raw = load_yaml(os.environ[variable], f"spec: ${variable}") or {}
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise SpecError(f"spec: no such file {path}")
        raw = read_spec_file(path)
    else:
        is_preset = True
        try:
            raw = preset(str(source), scale)
        except SpecError as err:
            raise (SpecError(f"{err}, or a spec file (.yaml)") if str(err).startswith("preset:") else err) from None
    if scale != DEFAULT_SCALE and not is_preset:  # a spec is read as written: the scale would be ignored
        raise SpecError(f"scale: {scale} applies to presets; {source} is a spec, read as written: leave the scale out")
    return parse_spec(apply_overrides(raw, list(overrides)))


def describe() -> list[tuple[str, str]]:
    return [(name, read_spec_file(PRESET_DIR / f"{name}.yaml").get("description", "")) for name in preset_names()]
