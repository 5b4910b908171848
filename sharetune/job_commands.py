"""`sharetune status`, `logs` and `stop`: the commands on a submitted search (a Ray Job), which only
talk to the cluster's dashboard. They load neither torch nor Tune, so they answer in about a second;
`sharetune.launch` runs them from here, and `sharetune.cli` lists them with the other commands. The
CLI's one-line errors (`fail`, `run`) live here, below both."""

from __future__ import annotations

import warnings
from typing import Optional

import typer

from sharetune.errors import ExitCode


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line: Python's format adds the file, the line number and the source line."""
    return f"{category.__name__}: {message}\n"


warnings.formatwarning = _one_line_warning


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> None:
    """One line and the exit code (sharetune.errors.ExitCode lists them all)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise SystemExit(code)  # past typer, which `run` tells from a Ctrl-C it swallowed


def run(app: typer.Typer) -> None:
    """Run `app` as the `sharetune` command. A usage mistake (an unknown command or option, an argument
    missing or extra, a value of the wrong type) is one line and exit 2, as other bad input is, instead
    of click's boxed usage. Click's exceptions are matched by what they carry: typer vendors click and
    exports none of their classes."""
    try:
        code = app(standalone_mode=False)  # commands end with SystemExit; typer answers a Ctrl-C with 130
    except KeyboardInterrupt:  # while typer built the command, before its own handler
        code = ExitCode.INTERRUPTED
    except Exception as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # no command given: the help (rich printed it making the error)
            if err.format_message():
                err.show()
            raise SystemExit(err.exit_code) from None
        if not (hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int)):
            raise
        where = getattr(err, "ctx", None)
        hint = f" (`{where.command_path} --help` says what it takes)" if where is not None else ""
        typer.secho(f"error: {' '.join(err.format_message().split()).rstrip('.')}{hint}", fg=typer.colors.RED, err=True)
        raise SystemExit(err.exit_code) from None
    if code == ExitCode.INTERRUPTED:  # a Ctrl-C no command caught: typer's answer was no word
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
    raise SystemExit(code if isinstance(code, int) else ExitCode.OK)


DASHBOARD = typer.Option(None, "--address", envvar="RAY_API_SERVER_ADDRESS", help="the Ray dashboard, http://HEAD:8265")


def status(job: str = typer.Argument(..., help="the id `sharetune submit` printed"), address: Optional[str] = DASHBOARD) -> None:
    """A submitted search's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from sharetune.search import jobs

    try:
        typer.echo(jobs.describe(jobs.status(address, job)))
    except jobs.JobsError as err:
        fail(str(err))


def logs(
    job: str = typer.Argument(...), address: Optional[str] = DASHBOARD,
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends, then exit with the search's exit code"),
) -> None:
    """A submitted search's output (its live progress lines included); with --follow, then the search's
    exit code."""
    from sharetune.search import jobs

    try:
        for chunk in jobs.logs(address, job, follow):
            typer.echo(chunk, nl=False)
        ended = jobs.status(address, job) if follow else None
    except jobs.JobsError as err:
        fail(str(err))
    if ended is None:
        return
    if not ended.status.is_terminal():
        fail(f"logs {job}: the log stream closed while the job is {ended.status.value}; follow it again")
    code = jobs.exit_code(ended)
    if code == ExitCode.NOT_STARTED:  # no search line ended the output: Ray's says why
        typer.secho(jobs.describe(ended), fg=typer.colors.RED, err=True)
    raise SystemExit(code)


def stop(job: str = typer.Argument(...), address: Optional[str] = DASHBOARD) -> None:
    """Stop a submitted search; its folder keeps what finished, so `sharetune resume` can continue it."""
    from sharetune.search import jobs

    try:
        typer.echo("stopping" if jobs.stop(address, job) else "already ended")
    except jobs.JobsError as err:
        fail(str(err))


JOB_COMMANDS = {"status": status, "logs": logs, "stop": stop}
app = typer.Typer(add_completion=False, rich_markup_mode="markdown")
for _name, _command in JOB_COMMANDS.items():
    app.command(_name)(_command)
