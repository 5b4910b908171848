"""Ray Tune trainables: a trial's typed settings -> model -> training -> one metrics record per epoch.

This is the package's public face; `sharetune.search` and the CLI import only these names.
"""

from sharetune.trainables.build import build_model, built_for, config_costs, costs_of
from sharetune.trainables.cluster_pretraining import cluster_pretrainer
from sharetune.trainables.distributed import DRIVER_MEMORY, run_checkpoint
from sharetune.trainables.export import export_trial, load_exported, load_preprocessing, read_exported, save_exported
from sharetune.trainables.preflight import check_model, check_search
from sharetune.trainables.pretraining import PRETRAINED_FILE, pretrain, pretrained_weights
from sharetune.trainables.trial import CONFIGURATION_ERROR, ConfigurationError, train_trial

__all__ = [
    "CONFIGURATION_ERROR", "DRIVER_MEMORY", "PRETRAINED_FILE", "ConfigurationError", "build_model", "built_for", "check_model", "check_search", "cluster_pretrainer", "config_costs", "costs_of", "export_trial",
    "load_exported", "load_preprocessing", "pretrain", "pretrained_weights", "read_exported", "save_exported", "run_checkpoint", "train_trial",
]
