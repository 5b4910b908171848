"""The search service: Tuner assembly, the search folder, MLflow logging, progress, reports and what
the console shows of them."""

from sharetune.search.mlflow_logger import parent_run_of, tracking_uri
from sharetune.search.report import build_report, log_report, pareto, trials_from_folder, trials_from_mlflow
from sharetune.search.storage import SearchFolder
from sharetune.search.tuner import Search, resume, run

__all__ = [
    "Search", "SearchFolder", "build_report", "log_report", "pareto", "parent_run_of", "resume", "run",
    "tracking_uri", "trials_from_folder", "trials_from_mlflow",
]
