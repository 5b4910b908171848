"""The search service: Tuner assembly, the search folder, MLflow logging, progress, reports and what
the console shows of them.

Names load on first use (PEP 562), so a command that only talks to a cluster's dashboard (`sharetune
status`, `logs`, `stop`) does not import Tune and MLflow first."""

from importlib import import_module

_HOMES = {"SearchFolder": "storage", "parent_run_of": "mlflow_logger", "tracking_uri": "mlflow_logger"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
