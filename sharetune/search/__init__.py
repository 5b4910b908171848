"""The search service: Tuner assembly, Optuna samplers, MLflow logging, progress and reports."""

from sharetune.search.report import build_report, log_report, pareto, trials_from_folder, trials_from_mlflow
from sharetune.search.samplers import SAMPLERS, make_sampler
from sharetune.search.tuner import Search, load_data, read_spec, resume, run

__all__ = [
    "SAMPLERS", "Search", "build_report", "load_data", "log_report", "make_sampler", "pareto", "read_spec",
    "resume", "run", "trials_from_folder", "trials_from_mlflow",
]
