"""One driver per search folder at a time.

A `resume` typed in a second terminal while the search still runs (or two searches given one --name)
restored, pruned and saved Tune's state and the MLflow runs under the running driver: a trial lost its
checkpoint and failed, the first search ended saying it was interrupted. So the process that drives a
search holds a lease on its folder: a small file naming it, rewritten every HEARTBEAT_S while it runs
and removed when it ends. Another driver refuses the folder in one line while the lease is live; a
lease left by a killed driver is not: on its machine the process is gone, elsewhere it was not
rewritten for EXPIRES_S. `sharetune list` reads the same lease to show a search as running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import psutil

from sharetune.search.storage import SearchFolder, StateError

# Not a .json: Tune copies a search folder's .json files into its staging folder when it restores a
# search and uploads them again with its state, which would put back an old heartbeat.
LEASE_FILE = "sharetune-driver.lease"
HEARTBEAT_S = 10.0
EXPIRES_S = 60.0  # a lease from another machine not rewritten for this long is a killed driver's

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Driver:
    """The process that holds a lease: `started` (its start time) tells it from a later process given the
    same pid; `seen` is when it last rewrote the lease, by its clock."""

    host: str
    pid: int
    started: float
    token: str
    seen: float

    @classmethod
    def this_process(cls) -> Driver:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), uuid.uuid4().hex, time.time())

    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether it still runs: on this machine, whether its process does; elsewhere, whether it rewrote
        the lease within EXPIRES_S."""
        if not self.here():
            return time.time() - self.seen < EXPIRES_S
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.started) < 1 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.AccessDenied:  # another user's process, which may be the driver: it holds
            return True
        except (psutil.Error, ValueError):  # no such process (or no pid at all): gone
            return False

    def described(self) -> str:
        if self.here():
            return f"pid {self.pid} on this machine"
        return (f"pid {self.pid} on {self.host}, its lease rewritten {time.time() - self.seen:.0f} s ago (one not "
                f"rewritten for {EXPIRES_S:.0f} s is a stopped driver's)")


def _recorded(folder: SearchFolder) -> Driver | None:
    """The driver the folder's lease names; None where there is none or it cannot be read as one."""
    data = folder.read(LEASE_FILE)
    if data is None:
        return None
    try:
        record = json.loads(data)
        return Driver(str(record["host"]), int(record["pid"]), float(record["started"]), str(record["token"]),
                      float(record["seen"]))
    except (ValueError, TypeError, KeyError):  # cut short, or not a lease: no driver holds it
        return None


def running_driver(folder: SearchFolder) -> Driver | None:
    """The driver running the search in `folder` now, if one is."""
    driver = _recorded(folder)
    return driver if driver is not None and driver.alive() else None


class _Heartbeat(threading.Thread):
    """Rewrites the lease every HEARTBEAT_S until stopped; then removes it, if it is still this driver's."""

    def __init__(self, folder: SearchFolder, driver: Driver) -> None:
        super().__init__(name="sharetune-lease", daemon=True)
        self.folder, self.driver, self.stopped = folder, driver, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                holder = _recorded(self.folder)
                if holder is not None and holder.token != self.driver.token:
                    log.warning("%s: %s took this search over; their results may mix", self.folder, holder.described())
                    return
                self.driver = replace(self.driver, seen=time.time())
                _write(self.folder, self.driver)
            except OSError:  # a full disk, a store that did not answer: the next beat tries again
                continue

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        with contextlib.suppress(OSError):
            holder = _recorded(self.folder)
            if holder is not None and holder.token == self.driver.token:
                self.folder.remove(LEASE_FILE)


def _write(folder: SearchFolder, driver: Driver) -> None:
    folder.write(LEASE_FILE, json.dumps(asdict(driver)).encode())


_DRIVEN: set[str] = set()  # the folders this process holds the lease of


@contextlib.contextmanager
def driving(folder: SearchFolder) -> Iterator[None]:
    """Hold `folder`'s lease while the block runs; StateError, in one line, where another driver holds it.
    A block inside one that holds it already (a resume that starts its search's trials) holds it as well."""
    if folder in _DRIVEN:
        yield
        return
    holder = running_driver(folder)
    driver = Driver.this_process()
    if holder is None:
        _write(folder, driver)
        holder = _recorded(folder)  # two drivers that wrote at once: the one whose lease stayed goes on
    if holder is None or holder.token != driver.token:
        who = holder.described() if holder is not None else "another driver"
        raise StateError(f"{folder}: {who} is running this search; wait for it to end, or stop it "
                         "(Ctrl-C) and resume then")
    heartbeat = _Heartbeat(folder, driver)
    heartbeat.start()
    _DRIVEN.add(folder)
    try:
        yield
    finally:
        _DRIVEN.discard(folder)
        heartbeat.stop()
