"""Did-you-mean for spec keys: the nearest valid path to an unknown one (`epochs` -> `fixed.epochs`).

A `--set epochs=3` puts `epochs` at the top of the spec, where pydantic reports only "unknown key";
the paths here come from the spec's models themselves, so a new field is suggested without listing it.
"""

from __future__ import annotations

import difflib
from types import UnionType
from typing import Iterable, Union, get_args, get_origin

from pydantic import BaseModel

# What `sharetune train` calls spec fields: its options' names
ALIASES = {"dataset": "data.name", "data_dir": "data.root"}
CUTOFF = 0.8  # difflib's similarity a typo must reach to be suggested


def _section(annotation) -> type[BaseModel] | None:
    """The model a spec key holds (DataSpec for `data`, Scheduler for an optional `scheduler`)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)


def spec_paths(spec: type[BaseModel], settings: Iterable[type[BaseModel]]) -> dict[str, str]:
    """Each name a user may write -> its path: every family's settings (fixed.epochs), the spec's
    sections' fields (data.name, budget.num_samples), the spec's own keys, and `ALIASES`."""
    paths = {name: f"fixed.{name}" for family in settings for name in family.model_fields}
    for key, field in spec.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            paths.update({name: f"{key}.{name}" for name in section.model_fields})
    paths.update({key: key for key in spec.model_fields})
    return {**paths, **ALIASES}


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """"did you mean 'x'? " for the allowed name nearest to an unknown one, or nothing."""
    near = difflib.get_close_matches(name, list(allowed), n=1)
    return f"did you mean {near[0]!r}? " if near else ""


def nearest_path(key: str, paths: dict[str, str]) -> str | None:
    """The valid path `key` (dotted, unknown) most likely meant: its last part's own path, a close
    spelling of the whole path, or of the last part; None when nothing is close."""
    leaf = key.rpartition(".")[2]
    if paths.get(leaf, key) != key:
        return paths[leaf]
    whole = difflib.get_close_matches(key, sorted(set(paths.values()) - {key}), n=1, cutoff=CUTOFF)
    if whole:
        return whole[0]
    names = difflib.get_close_matches(leaf, list(paths), n=1, cutoff=CUTOFF)
    return paths[names[0]] if names and paths[names[0]] != key else None
