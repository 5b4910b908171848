"""Searches as Ray Jobs on a running cluster: submit, follow, stop.

The validated spec travels in the job's runtime environment (env var SHARETUNE_SPEC), so nothing
but the cluster's own image is needed on the head node; the job's driver runs `sharetune search`
there against the cluster (`--address auto`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import aiohttp
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from sharetune.errors import ExitCode, first_line

if TYPE_CHECKING:  # a dashboard command needs no models, so no torch
    from sharetune.spaces import SearchSpec

SPEC_ENV = "SHARETUNE_SPEC"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's, which it prefers to the address it is given
JOBS_SDK_LOGGER = "ray.dashboard.modules.job.sdk"  # Ray sets it to INFO
AGENT_WAIT_S = 60.0  # a node lost moments ago is offered as the job agent until Ray marks it dead
T = TypeVar("T")


class JobsError(RuntimeError):
    """The dashboard cannot be reached, or refused the request (one line, for the CLI)."""


def client(address: str | None) -> JobSubmissionClient:
    """`address`: the dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS). One
    given wins over those variables, which Ray would take instead; one without a scheme is refused
    (Ray would wait most of a minute for a cluster's GCS there), and one of another scheme (ftp://)."""
    if address is None:
        return JobSubmissionClient(None)
    scheme, _, rest = address.rpartition("://")
    if address != "auto" and scheme not in ("http", "https", "ray"):  # Ray would take another as a module's name
        host = rest.rpartition(":")[0] or rest.partition("/")[0]
        raise ValueError(f"give the dashboard's URL, e.g. http://{host}:8265")
    hidden = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(hidden)


def _ask(address: str | None, request: Callable[[JobSubmissionClient], T]) -> T:
    """`request` against the dashboard; its failure as one JobsError line. Ray answers "No available
    agent" while it still counts a crashed node alive: asked again for up to AGENT_WAIT_S."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        dashboard = None
        try:
            dashboard = client(address)
            return request(dashboard)
        except (RuntimeError, ConnectionError, ValueError, AuthenticationError) as err:  # ValueError: an address Ray cannot parse
            line = " ".join(str(err).split())  # the dashboard's answers come wrapped over lines
            if "No available agent" in line and time.monotonic() < deadline:
                time.sleep(2)
                continue
            given = address or any(os.environ.get(v) for v in ADDRESS_VARIABLES)
            if dashboard is None and not given:  # Ray looked for a local cluster and found none
                raise JobsError("--address: no Ray cluster given and none runs here; give its dashboard, "
                                "e.g. --address http://HEAD:8265 (or set $RAY_API_SERVER_ADDRESS)") from None
            where = address or "from $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS"
            if isinstance(err, AuthenticationError):  # its text is a paragraph on token setup
                raise JobsError(f"--address {where}: the dashboard refused this client's token ({first_line(err)}); "
                                "send the cluster's: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)") from None
            if "status code 404: " in line:  # an unknown job: not the address's fault
                raise JobsError(f"{line.partition('status code 404: ')[2].rstrip('.')} on the dashboard at {where}") from None
            raise JobsError(f"--address {where}: {line}") from None


def submit(spec: SearchSpec, address: str | None, *, mlflow_uri: str | None = None, storage: str | None = None,
           name: str | None = None) -> str:
    command = ["sharetune", "search", f"env:{SPEC_ENV}", "--address", "auto"]
    for flag, value in (("--mlflow-uri", mlflow_uri), ("--storage", storage), ("--name", name)):
        if value:
            command += [flag, value]
    return _ask(address, lambda jobs: jobs.submit_job(
        entrypoint=shlex.join(command),
        runtime_env={"env_vars": {SPEC_ENV: spec.to_yaml()}},
        metadata={"sharetune.spec": spec.name},
    ))


def status(address: str | None, job_id: str) -> JobDetails:
    return _ask(address, lambda jobs: jobs.get_job_info(job_id))


def describe(job: JobDetails) -> str:
    """The job's state in one line. Ray's message for a failed search holds the last lines of its
    output: the line gives the search's exit code instead, and where its output is."""
    if job.status == JobStatus.FAILED and job.driver_exit_code is not None:
        return (f"FAILED: the search exited with code {job.driver_exit_code}; "
                f"its output: sharetune logs {job.submission_id}")
    lines = [line for line in (job.message or "").splitlines() if line.strip()]
    return f"{job.status.value}: {lines[-1].strip()}" if lines else job.status.value


def exit_code(job: JobDetails) -> int:
    """What `sharetune logs --follow` exits with once the job ended: the search's own exit code
    (sharetune.errors.ExitCode); a stop interrupts it as Ctrl-C does."""
    if job.status == JobStatus.SUCCEEDED:
        return ExitCode.OK
    if job.status == JobStatus.STOPPED:
        return ExitCode.INTERRUPTED
    code = job.driver_exit_code
    if code is None:  # the driver never ran to an end: it could not start
        return ExitCode.NOT_STARTED
    return code if code > 0 else 128 - code  # -N: killed by signal N, as a shell reports it


def logs(address: str | None, job_id: str, follow: bool = False) -> Iterator[str]:
    # an unknown job or a refused token: one line, first; an ended job's output is whole: Ray's stream of it
    # would close only seconds after the last line
    if not follow or status(address, job_id).status.is_terminal():
        yield _ask(address, lambda jobs: jobs.get_job_logs(job_id))
        return
    logging.getLogger(JOBS_SDK_LOGGER).setLevel(logging.WARNING)  # its INFO line on the stream's close
    stream = _ask(address, lambda jobs: jobs.tail_job_logs(job_id).__aiter__())
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            except (RuntimeError, ConnectionError, OSError, aiohttp.ClientError) as err:  # the head went away mid-stream
                raise JobsError(f"logs {job_id}: the dashboard's log stream broke ({first_line(err) or type(err).__name__})") from None
    finally:
        loop.close()


def stop(address: str | None, job_id: str) -> bool:
    return _ask(address, lambda jobs: jobs.stop_job(job_id))
