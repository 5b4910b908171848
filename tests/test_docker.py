"""The Docker and Kubernetes files, checked the way CI can without a Docker engine."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKER = Path(__file__).parent.parent / "docker"
HADOLINT = Path(sys.executable).parent / "hadolint"
RAY_SERVICES = ("ray-head", "worker")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def expand(text: str, env: dict[str, str]) -> str:
    """Compose's ${NAME:-default} interpolation."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], text)


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.rglob("Dockerfile*")), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_non_root_and_bakes_no_secrets():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG FLAVOR=cpu" in text and "base-cuda" in text and "pytorch/pytorch:" in text
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3 and "COPY --from=build" in text
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 1000", runtime, re.M)
    # the one package the runtime installs is the compiler of ArbNet's kernels, without apt's lists
    assert "install -y --no-install-recommends g++" in runtime and "rm -rf /var/lib/apt/lists/*" in runtime
    assert not re.search(r"(TOKEN|PASSWORD|SECRET)\s*=", text, re.I)


def test_compose_has_every_service_with_a_healthcheck():
    services = compose()["services"]
    assert set(services) == {"ray-head", "worker", "mlflow", "postgres"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_the_worker_healthcheck_passes_where_a_raylet_runs(tmp_path):
    """Run as the image would (sh alone) beside a process
    named raylet; a copy of sleep stands in for Ray's."""
    (test,) = [compose()["services"]["worker"]["healthcheck"]["test"]]
    assert test[0] == "CMD-SHELL"
    raylet = tmp_path / "raylet"
    raylet.write_bytes(Path("/bin/sleep").read_bytes())
    raylet.chmod(0o755)
    with subprocess.Popen([str(raylet), "60"]) as process:
        try:
            assert subprocess.run(["sh", "-c", test[1]], timeout=30).returncode == 0
        finally:
            process.kill()


def test_stop_sends_ctrl_c_on_every_stack():
    """`sharetune stop` interrupts a search as Ctrl-C does (its runs end KILLED, it resumes): Ray's job
    supervisor sends RAY_JOB_STOP_SIGNAL, by default SIGTERM and SIGKILL 3 s later."""
    wanted = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    for name in RAY_SERVICES:
        assert wanted.items() <= compose()["services"][name]["environment"].items(), name
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        text = (DOCKER / "kuberay" / manifest).read_text()
        assert "{name: RAY_JOB_STOP_SIGNAL, value: SIGINT}" in text and '{name: RAY_JOB_STOP_WAIT_TIME_S, value: "120"}' in text


def test_published_ports_bind_to_loopback_unless_overridden():
    published = [(name, port) for name, s in compose()["services"].items() for port in s.get("ports", [])]
    assert published and "worker" not in {name for name, _ in published}  # workers scale: no host ports
    for name, port in published:
        assert expand(port, {}).startswith("127.0.0.1:"), f"{name}: {port}"
        assert expand(port, {"SHARETUNE_BIND": "0.0.0.0"}).startswith("0.0.0.0:")


def test_ray_token_auth_is_on_everywhere_and_comes_from_a_secret():
    spec = compose()
    for name in RAY_SERVICES:
        service = spec["services"][name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_token"
        assert "ray_token" in service["secrets"] and "container_name" not in service
    assert spec["secrets"]["ray_token"] == {"file": "./secrets/ray_token"}
    assert (DOCKER / "secrets" / ".gitignore").read_text().startswith("*")  # never committed


def test_mlflow_server_allows_its_service_name_and_stores_in_postgres():
    mlflow = " ".join(compose()["services"]["mlflow"]["command"])
    assert '--allowed-hosts "mlflow:5000' in mlflow and "postgresql://" in mlflow and "--serve-artifacts" in mlflow
    assert compose()["services"]["ray-head"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_runs_basic_auth_and_no_password_is_on_a_command_line():
    spec = compose()
    mlflow = spec["services"]["mlflow"]
    script = mlflow["command"][2]
    server = script[script.index("exec mlflow server"):]
    assert "--app-name basic-auth" in server and "postgresql://mlflow@postgres:5432/mlflow" in server
    assert "$" not in server and "password" not in server.lower()  # the command line the server runs with
    # the secrets reach the environment through the shell's builtins (an assignment, export), not a program's arguments
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$$(cat /run/secrets/mlflow_password)"' in script
    assert 'PGPASSWORD="$$(cat /run/secrets/postgres_password)"' in script
    assert 'MLFLOW_FLASK_SERVER_SECRET_KEY="$$(cat /run/secrets/mlflow_secret_key)"' in script
    assert set(mlflow["secrets"]) == {"postgres_password", "mlflow_password", "mlflow_secret_key"}
    (config,) = mlflow["configs"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == config["target"]
    ini = (DOCKER / spec["configs"][config["source"]]["file"]).read_text()
    assert "admin_username = admin" in ini and "default_permission = NO_PERMISSIONS" in ini
    assert "admin_password" not in ini and "postgresql://mlflow@postgres" in ini
    for name in RAY_SERVICES:  # the clients log in from the same secret
        service = spec["services"][name]
        assert service["environment"]["MLFLOW_TRACKING_USERNAME"] == "admin"
        assert service["environment"]["MLFLOW_TRACKING_PASSWORD_FILE"] == "/run/secrets/mlflow_password"
        assert "mlflow_password" in service["secrets"]
    assert spec["secrets"]["mlflow_password"] == {"file": "./secrets/mlflow_password"}


def load_lock_tool():
    found = importlib.util.spec_from_file_location("lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def test_the_image_installs_exact_versions_from_a_lock_that_matches_pyproject():
    lock = load_lock_tool()
    text = lock.LOCK.read_text()
    assert text == lock.render(lock.closure()), "docker/requirements.lock is stale: run python docker/lock.py"
    pins = dict(line.split("==") for line in text.splitlines() if not line.startswith("#"))
    project = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["server"]]:
        requirement = Requirement(text)
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement}: locked at {pinned}"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "RUN pip install -r requirements.lock" in dockerfile and "RUN pip install --no-deps ." in dockerfile


def test_gpu_override_reserves_devices_for_workers():
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]["worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--num-gpus" in gpu["command"]


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    manifest = yaml.safe_load((DOCKER / "kuberay" / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    cluster = manifest["spec"] if kind == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__  # head, workers and clients on one Ray version
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    if kind == "RayJob":
        from sharetune.spaces import parse_spec

        shipped = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]["SHARETUNE_SPEC"]
        assert parse_spec(yaml.safe_load(shipped)).multi_objective
