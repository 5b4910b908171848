"""`sharetune` commands as real processes, forked from one that has loaded the command's libraries.

A fresh interpreter spends seconds importing torch before a command can answer; tests that check how
dozens of bad inputs are answered would spend minutes on that alone. The server imports what the
`sharetune` command imports on its way to a command (`sharetune.launch`, `sharetune.cli`) and the
libraries a search loads after its first checks (Ray Tune, Optuna, MLflow), then forks a child per
command: each child is its own process with its own argv, working directory, stdin (empty), stdout,
stderr and exit code. Only for commands run in the server's environment (a few settings are read
from it as modules load) that start no Ray of their own (a child's exit runs the atexit handlers,
not an interpreter's whole shutdown).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 300  # as long as a command may take to answer
SERVER = r"""
import atexit, json, os, signal, sys, traceback
import sharetune.cli, sharetune.launch  # what every command loads first, loaded once
import mlflow, optuna, ray.tune, sharetune.search.tuner  # and what a search loads after its first checks

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            signal.alarm(request["timeout"])  # a command that hangs dies of it, as subprocess.run's timeout kills
            os.chdir(request["cwd"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's requests
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["sharetune", *request["args"]]
            try:
                sharetune.launch.main()
                code = 0
            except SystemExit as exit:  # as the interpreter ends on it: a code, or a message and 1
                code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            atexit._run_exitfuncs()  # as an interpreter's exit runs them (logging's last flush, say)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
"""


class ForkedCommands:
    """Run `sharetune ARGS` in a fresh fork of the server; `run` answers as subprocess.run would."""

    def __init__(self, env: dict[str, str]) -> None:
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="sharetune-forked-") as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            request = {"args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "timeout": TIMEOUT_S}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            answer = self.server.stdout.readline()  # the child's exit code, at most TIMEOUT_S later
            if not answer:
                raise RuntimeError(f"the forking server ended with {self.server.wait()}")
            return subprocess.CompletedProcess(["sharetune", *args], int(answer), out.read_text(), err.read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
