"""`sharetune` commands as real processes, forked from one that has loaded the command's libraries.

A fresh interpreter spends seconds importing torch before a command can answer; tests that check how
dozens of bad inputs are answered would spend minutes on that alone. The server imports what the
`sharetune` command imports on its way to a command (`sharetune.launch`, `sharetune.cli`), then forks
a child per command: each child is its own process with its own argv, working directory, stdout,
stderr and exit code, and loads the rest (Ray, MLflow) itself, as the installed command would. Only
for commands run in the server's environment: a few settings are read from it as modules load.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 300  # as long as a command may take to answer
SERVER = r"""
import atexit, json, os, sys, traceback
import sharetune.cli, sharetune.launch  # what every command loads first, loaded once
import mlflow, optuna, ray.tune, sharetune.search.tuner  # and what a search loads after its first checks

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["sharetune", *request["args"]]
            try:
                sharetune.launch.main()
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            except BaseException:
                traceback.print_exc()
        finally:
            atexit._run_exitfuncs()  # as an interpreter's exit runs them: a Ray the command started is stopped
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
            self.server.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}) + "\n")
            self.server.stdin.flush()
            if not select.select([self.server.stdout], [], [], TIMEOUT_S)[0]:
                self.server.kill()
                raise TimeoutError(f"sharetune {' '.join(args)}: no answer in {TIMEOUT_S} s")
            answer = self.server.stdout.readline()
            if not answer:
                raise RuntimeError(f"the forking server ended with {self.server.wait()}")
            return subprocess.CompletedProcess(["sharetune", *args], int(answer), out.read_text(), err.read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
