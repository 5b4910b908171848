"""Search spaces: trial settings, specs (YAML or presets) and their validation, the Optuna space and
sampler they define."""

from sharetune.spaces.locations import check_database_url, safe_name
from sharetune.spaces.presets import DEFAULT_SCALE, SCALES, describe, load_spec, preset, preset_names
from sharetune.spaces.samplers import SAMPLERS
from sharetune.spaces.settings import FAMILIES, ArbNetSettings, FamilySettings, SpinSettings, trial_settings
from sharetune.spaces.space import OptunaSpace, make_sampler, rehearse_sampler
from sharetune.spaces.spec import Bound, SearchSpec, SpecError, describe_error, parse_spec

__all__ = [
    "DEFAULT_SCALE", "FAMILIES", "SAMPLERS", "SCALES", "ArbNetSettings", "Bound", "FamilySettings", "OptunaSpace", "SearchSpec", "SpecError",
    "SpinSettings", "check_database_url", "describe", "describe_error", "load_spec", "make_sampler", "parse_spec", "preset", "preset_names",
    "rehearse_sampler", "safe_name", "trial_settings",
]
