"""Search spaces: specs (YAML or presets), their validation, and the Optuna space they define."""

from sharetune.spaces.presets import SCALES, describe, load_spec, preset, preset_names
from sharetune.spaces.settings import FAMILIES, METRICS
from sharetune.spaces.spec import SAMPLERS, SearchSpec, SpecError, parse_spec

__all__ = [
    "FAMILIES", "METRICS", "SAMPLERS", "SCALES", "SearchSpec", "SpecError", "describe", "load_spec",
    "parse_spec", "preset", "preset_names",
]
