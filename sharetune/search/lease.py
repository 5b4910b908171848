"""One driver per search folder at a time.

A `resume` typed in a second terminal while the search still runs (or two searches given one --name)
restored, pruned and saved Tune's state and the MLflow runs under the running driver: a trial lost its
checkpoint and failed, the first search ended saying it was interrupted. So the process that drives a
search holds a lease on its folder: a small file naming it, rewritten every HEARTBEAT_S while it runs
and removed when it ends. Another driver refuses the folder in one line while the lease is live; a
lease left by a killed driver is not: on its machine the process is gone, elsewhere it was not
rewritten for EXPIRES_S. `sharetune list` reads the same lease to show a search as running.

Taking it is check, write, then read back SETTLE_S later and mark it confirmed (a resume takes it
before Ray starts and confirms it after, which takes longer): of two drivers that checked at once, the
one whose lease stayed goes on. A driver that finds another's confirmed lease in place of its own (its
own deleted, or unwritten past EXPIRES_S) exits at once, as kill -9 would: a stop as Ctrl-C's would save
Tune's state, prune checkpoints and end MLflow runs under the driver that went on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from sharetune.errors import ExitCode, first_line
from sharetune.search.storage import SearchFolder, StateError
from sharetune.storage_filesystem import is_uri

# Not a .json: Tune copies a search folder's .json files into its staging folder when it restores a
# search and uploads them again with its state, which would put back an old heartbeat.
LEASE_FILE = "sharetune-driver.lease"
HEARTBEAT_S = 10.0
EXPIRES_S = 60.0  # a lease from another machine not rewritten for this long is a stopped driver's
SETTLE_S = 0.5  # longer than any driver takes from reading the lease to writing its own (an object store's too)
MOST_BYTES = 4096  # a lease is some 200 bytes: a larger file is not one, and is not read whole
RESUME_LATER = "wait for it to end, or stop it (Ctrl-C) and resume then"  # what a refused driver should do
ANOTHER_NAME = "give this search another --name"

log = logging.getLogger(__name__)


@functools.cache
def this_machine() -> str:
    """What makes a pid name one process: the host, and on Linux its boot and pid namespace (containers
    that share the host's name, or the host rebooted, give the same pid to other processes)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts += [Path("/proc/sys/kernel/random/boot_id").read_text().strip(), str(os.stat("/proc/self/ns/pid").st_ino)]
    return " ".join(parts)


def process_start(pid: int) -> float | None:
    """When process `pid` started, as no clock change moves it; None where it is gone or a zombie. On
    Linux its start in clock ticks since boot: psutil's create_time adds the boot time computed now,
    which a stepped clock (NTP, a resumed VM) shifts."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()  # PermissionError under hidepid: see Driver.alive
    except ProcessLookupError:  # it ended while read
        return None
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():  # Linux: no such process
            return None
        try:  # no /proc: psutil's (psutil.AccessDenied for another user's process)
            process = psutil.Process(pid)
            return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
        except psutil.NoSuchProcess:
            return None
    state, *fields = stat.rpartition(b")")[2].split()  # after the command's name, which may hold anything
    return None if state == b"Z" else float(fields[18])  # field 22 of proc_pid_stat(5): starttime


@dataclass(frozen=True)
class Driver:
    """The process that holds a lease. `started` tells it from a later process given the same pid; `seen`
    is when it last rewrote the lease, by its clock; `host` is the part of `machine` people read;
    `confirmed`: it read its lease back and goes on."""

    host: str
    machine: str
    pid: int
    started: float
    token: str
    seen: float
    confirmed: bool = False

    @classmethod
    def this_process(cls) -> Driver:
        return cls(socket.gethostname(), this_machine(), os.getpid(), process_start(os.getpid()), uuid.uuid4().hex,
                   time.time())

    def here(self) -> bool:
        return self.machine == this_machine()

    def alive(self) -> bool:
        """Whether it still runs: on this machine, whether its process does; elsewhere, whether it rewrote
        the lease within EXPIRES_S."""
        if not self.here():  # its clock may be a little ahead of this one's, not hours
            return abs(time.time() - self.seen) < EXPIRES_S
        try:
            return self.pid > 0 and process_start(self.pid) == self.started
        except (psutil.AccessDenied, PermissionError):  # another user's process, which may be the driver: it holds
            return True

    def is_this_process(self) -> bool:
        return self.here() and self.pid == os.getpid()

    def described(self) -> str:
        if self.here():
            return f"pid {self.pid} on this machine"
        return (f"pid {self.pid} on {self.host}, its lease rewritten {max(time.time() - self.seen, 0):.0f} s ago (one "
                f"not rewritten for {EXPIRES_S:.0f} s is a stopped driver's)")


def _recorded(folder: SearchFolder) -> Driver | None:
    """The driver the folder's lease names; None where there is none or it is not one. StateError where it
    cannot be read."""
    try:
        data = folder.read(LEASE_FILE, MOST_BYTES)
    except OSError as err:
        raise StateError(f"{folder}: its driver's lease {LEASE_FILE} cannot be read ({first_line(err)})") from None
    if data is None or len(data) == MOST_BYTES:
        return None
    try:
        record = json.loads(data)
        return Driver(str(record["host"]), str(record["machine"]), int(record["pid"]), float(record["started"]),
                      str(record["token"]), float(record["seen"]), record["confirmed"] is True)
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError):  # cut short, or not a lease
        return None


def running_driver(folder: SearchFolder) -> Driver | None:
    """The driver running the search in `folder` now, if one is."""
    driver = _recorded(folder)
    return driver if driver is not None and driver.alive() else None


def _write(folder: SearchFolder, driver: Driver) -> None:
    folder.write(LEASE_FILE, json.dumps(asdict(driver)).encode())


def _stop_now(folder: SearchFolder, holder: Driver) -> None:
    sys.stdout.flush()  # the last progress lines, where stdout is a pipe or a log
    print(f"error: {folder}: {holder.described()} took this search over, its lease in place of this driver's; this "
          "driver stopped at once, as kill -9 stops one, and left the search to it", file=sys.stderr, flush=True)
    os._exit(ExitCode.INTERRUPTED)


class _Heartbeat(threading.Thread):
    """Rewrites the lease every HEARTBEAT_S until stopped, from the moment the driver takes it (a resume loads
    its data before it confirms). Before this driver confirmed, another driver's lease means that one went
    on first: this one leaves it be and is refused when it confirms. After, another's confirmed lease means
    it took the search over: this driver stops at once; an unconfirmed one is refused when it confirms."""

    def __init__(self, folder: SearchFolder, driver: Driver) -> None:
        super().__init__(name="sharetune-lease", daemon=True)
        self.folder, self.driver = folder, driver
        self.stopped, self.lock = threading.Event(), threading.Lock()  # a beat and a confirm do not interleave

    def beat(self, confirming: bool = False) -> Driver | None:
        """Rewrite the lease (`confirming` it); the other driver whose lease it left in place, if any."""
        with self.lock:
            holder = _recorded(self.folder)
            if holder is not None and holder.token != self.driver.token:
                if not self.driver.confirmed:
                    return holder
                if holder.confirmed:
                    _stop_now(self.folder, holder)
            if not self.stopped.is_set():  # a beat that outlived its lease (a slow store) writes nothing
                self.driver = replace(self.driver, seen=time.time(), confirmed=self.driver.confirmed or confirming)
                _write(self.folder, self.driver)
        return None

    def run(self) -> None:
        failing = False
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.beat()
                failing = False
            except Exception as err:  # a full disk, a store that does not answer: the next beat tries again
                if not failing:
                    log.warning("%s: cannot rewrite this driver's lease (%s); another machine takes a lease not "
                                "rewritten for %.0f s for a stopped driver's", self.folder, first_line(err), EXPIRES_S)
                failing = True


class Lease:
    """A driver's hold on a search folder, as a context: taken on entry (StateError, in one line, where another
    driver runs the search), `confirm`ed before the driver writes anything else, released on exit. Inside a
    block that holds the folder already (a resume that starts its search's trials) it is that block's."""

    _held: dict[str, Lease] = {}  # folder -> the lease this process holds on it

    def __init__(self, folder: SearchFolder, refusal: str = RESUME_LATER) -> None:
        self.folder, self.refusal = folder, refusal
        self.heartbeat: _Heartbeat | None = None  # this driver's, once it took the lease
        self.made = False  # whether writing the lease made the folder
        self.written = 0.0  # when, by time.monotonic

    def __enter__(self) -> Lease:
        if self.folder in self._held:
            return self._held[self.folder]
        holder = running_driver(self.folder)
        if holder is not None and not holder.is_this_process():  # (this process's: one a slow beat wrote back)
            self._refuse(holder.described())
        driver = Driver.this_process()
        self.made = not is_uri(self.folder) and not Path(self.folder).exists()
        _write(self.folder, driver)
        self.written, self.heartbeat = time.monotonic(), _Heartbeat(self.folder, driver)
        self.heartbeat.start()
        self._held[self.folder] = self
        return self

    def _refuse(self, who: str) -> None:
        raise StateError(f"{self.folder}: {who} is running this search; {self.refusal}")

    def confirm(self) -> None:
        """Read the lease back, SETTLE_S after it was written, and mark it confirmed: StateError where another
        driver's replaced it."""
        if self.heartbeat.driver.confirmed:
            return
        time.sleep(max(self.written + SETTLE_S - time.monotonic(), 0))
        other = self.heartbeat.beat(confirming=True)
        if other is not None:
            self._refuse(other.described())

    def __exit__(self, *exc) -> None:
        if self.heartbeat is None:  # another block's
            return
        del self._held[self.folder]
        self.heartbeat.stopped.set()
        self.heartbeat.join(timeout=HEARTBEAT_S)  # a store that hangs does not hold the exit
        with contextlib.suppress(OSError, StateError):
            holder = _recorded(self.folder)
            if holder is not None and holder.token == self.heartbeat.driver.token:
                self.folder.remove(LEASE_FILE)
            if self.made:
                os.rmdir(self.folder)  # where nothing else was written (a new search another driver took first)
