"""Searches as Ray Jobs on a running cluster: submit, follow, stop.

The validated spec travels in the job's runtime environment (env var SHARETUNE_SPEC), so nothing
but the cluster's own image is needed on the head node; the job's driver runs `sharetune search`
there against the cluster (`--address auto`).
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

from sharetune.spaces import SearchSpec

SPEC_ENV = "SHARETUNE_SPEC"


def client(address: str | None) -> JobSubmissionClient:
    """`address`: the dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)."""
    return JobSubmissionClient(address)


def submit(spec: SearchSpec, address: str | None, *, mlflow_uri: str | None = None, storage: str | None = None,
           name: str | None = None) -> str:
    command = ["sharetune", "search", f"env:{SPEC_ENV}", "--address", "auto"]
    for flag, value in (("--mlflow-uri", mlflow_uri), ("--storage", storage), ("--name", name)):
        if value:
            command += [flag, value]
    return client(address).submit_job(
        entrypoint=shlex.join(command),
        runtime_env={"env_vars": {SPEC_ENV: spec.to_yaml()}},
        metadata={"sharetune.spec": spec.name},
    )


def status(address: str | None, job_id: str) -> tuple[JobStatus, str]:
    info = client(address).get_job_info(job_id)
    return info.status, info.message or ""


def logs(address: str | None, job_id: str, follow: bool = False) -> Iterator[str]:
    jobs = client(address)
    if not follow:
        yield jobs.get_job_logs(job_id)
        return
    stream = jobs.tail_job_logs(job_id).__aiter__()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(address: str | None, job_id: str) -> bool:
    return client(address).stop_job(job_id)
