"""Tiny specs for tests: synthetic data, small nets, a handful of epochs."""


def tiny_spec(**changes) -> dict:
    spec = {
        "name": "tiny", "family": "arbnet", "data": {"name": "synthetic"},
        "fixed": {"table_size": 64, "epochs": 2, "hidden": [16]},
        "dimensions": {"hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.01, 10.0]}},
        "objectives": {"test_accuracy": "max"},
        "budget": {"num_samples": 4, "max_concurrent": 2},
    }
    spec.update(changes)
    return spec
