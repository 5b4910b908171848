"""Connect to Ray and check, before any trial, that the cluster can run one.

Ray retries an unreachable GCS address for minutes, so an explicit host:port is probed first with
a bounded TCP connect; a spec asking for more per trial than the whole cluster has would leave its
trials PENDING forever, so it is refused at once, naming the spec field.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import ray
from ray._private import worker as ray_worker
from ray._private.node import Node as RayNode

from sharetune.errors import ExitCode, first_line
from sharetune.spaces.spec import Resources

CONNECT_TIMEOUT_S = 10.0  # how long an explicit --address may take to accept a TCP connection
RAY_GONE_WAIT_S = 2.0  # how long a SIGTERM waits to see whether it also ended the Ray this driver started
RAY_GONE = ("error: interrupted, and the SIGTERM stopped the search's own Ray too (it went to the whole process group), "
            "so the search ended as if killed: `sharetune resume` continues it from its last saved state "
            "(`sharetune list` names its folder)")


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or cannot run one trial of the spec."""


def _host_port(address: str) -> tuple[str, int] | None:
    """The host and port an explicit address names (ray://host:port or host:port); None for `auto`, or
    an address of another kind (http://: a dashboard's)."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if "://" in rest or not (host and port.isdigit() and 0 < int(port) < 65536):
        return None
    return host, int(port)


def check_reachable(address: str | None) -> None:
    """An explicit host:port must accept a TCP connection within CONNECT_TIMEOUT_S (None, auto: nothing
    to probe). A search calls it first, before the data loads, so an unreachable address fails in seconds."""
    if address is None or address == "auto":
        return
    target = _host_port(address)
    if target is None:
        dashboard = " (an http:// address is the dashboard's, which `sharetune submit` takes)" if address.startswith("http") else ""
        raise ClusterError(f"--address {address}: give host:port, ray://host:port, or auto{dashboard}")
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterError(f"--address {address}: no Ray cluster answers there ({err.strerror or err}); "
                           "check the host and port, or leave --address out to start a local Ray") from None


def start_ray(address: str | None) -> None:
    """Join `address` (auto, host:port, ray://host:10001) or, with none, start a new embedded local Ray
    (never a cluster that happens to run on this machine). Ray 2.60 gives a new local Ray token
    authentication unless $RAY_AUTH_MODE says otherwise: its ports listen on the node's address, but
    answer only clients holding the token in ~/.ray/auth_token."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as err:  # `auto` with no cluster running
        raise ClusterError(f"--address {address}: {first_line(err) or 'no Ray cluster answered'}") from None
    if threading.current_thread() is threading.main_thread():
        dead_at_start = _dead(ray_worker._global_node)
        # replaces ray.init's handler, which exited at once
        signal.signal(signal.SIGTERM, lambda number, frame: interrupt_on_sigterm(number, frame, dead_at_start))


def interrupt_on_sigterm(number: int, frame, dead_at_start: frozenset[int] = frozenset()) -> None:
    """A SIGTERM (kill, docker stop, a Ray job's stop) ends the search as Ctrl-C does: Tune saves its
    state, MLflow's runs end KILLED, exit 130. Ray's handler exited mid-loop (exit 134), leaving the
    runs RUNNING. `dead_at_start`: the Ray processes already dead when Ray started (none, normally)."""
    _exit_if_ray_died(ray_worker._global_node, dead_at_start)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Tune's while it runs the trials, else Python's KeyboardInterrupt
        handler(signal.SIGINT, frame)
    else:  # Ctrl-C ignored (a search a script started in the background): SIGTERM still stops it
        raise KeyboardInterrupt


def _dead(node: RayNode | None) -> frozenset[int]:
    """The ids of the processes `node` started that have died (Ray's own stops are not counted)."""
    return frozenset(process.pid for _, process in node.dead_processes()) if node is not None else frozenset()


def _exit_if_ray_died(node: RayNode | None, dead_at_start: frozenset[int]) -> None:
    """A SIGTERM to the search's whole process group (systemd's stop, `timeout` without --foreground,
    `kill -- -PGID`) also reaches the Ray this driver started: Tune's stop then waited on its GCS for
    60 s, holding the interpreter, until Ray aborted the process (exit 1, with its own message). Where
    one of its processes died since Ray started (the log monitor does at the signal), end now instead,
    as a kill -9 would, which `resume` recovers from. Checked here, before Tune's stop begins: no thread
    runs once it waits. A driver joined to a cluster started no processes: nothing to watch."""
    deadline = time.monotonic() + RAY_GONE_WAIT_S
    while node is not None and node.all_processes and time.monotonic() < deadline:
        if _dead(node) - dead_at_start:
            sys.stdout.flush()  # the last progress lines, where stdout is a pipe or a log
            print(RAY_GONE, file=sys.stderr, flush=True)
            os._exit(ExitCode.INTERRUPTED)
        time.sleep(0.02)


def check_resources(resources: Resources, total: dict[str, float]) -> None:
    """A trial needs `workers` x (cpu, gpu); the cluster's total (`ray.cluster_resources()`) must hold one."""
    for field, key in (("cpu", "CPU"), ("gpu", "GPU")):
        each = getattr(resources, field)
        need, have = each * resources.workers, total.get(key, 0.0)
        if need > have:
            asked = f"{each:g} per worker x {resources.workers} workers = {need:g}" if resources.workers > 1 else f"{each:g}"
            raise ClusterError(f"resources.{field}: {asked} per trial, but the cluster has {have:g} {key}s")
