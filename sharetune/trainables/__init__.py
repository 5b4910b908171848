"""Ray Tune trainables: thin wrappers that build a model from a trial's config, train, and report."""

from sharetune.trainables.build import build_model, settings_of
from sharetune.trainables.trial import static_metrics, train_trial

__all__ = ["build_model", "settings_of", "static_metrics", "train_trial"]
