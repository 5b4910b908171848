"""One driver per search folder: the lease a search's driver holds, with real processes holding it, real
kills, and leases written as another machine's driver leaves them. A `resume` of a running search, end
to end, is in test_search_cli.py."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharetune.search import lease
from sharetune.search.lease import LEASE_FILE, Lease, running_driver, this_machine
from sharetune.search.storage import SearchFolder, StateError

HOLD = ("import sys\nfrom sharetune.search.lease import Lease\nfrom sharetune.search.storage import SearchFolder\n"
        "with Lease(SearchFolder(sys.argv[1])) as lease:\n    lease.confirm()\n    print('held', flush=True)\n"
        "    sys.stdin.read()\n")
REFUSED = "is running this search; wait for it to end, or stop it (Ctrl-C) and resume then"


def holder(folder: SearchFolder) -> subprocess.Popen:
    """A process that holds the folder's lease until its stdin closes."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def refusal(folder: SearchFolder) -> str:
    with pytest.raises(StateError) as refused, Lease(folder):
        pytest.fail("a second driver ran")
    return str(refused.value)


def write_lease(folder: SearchFolder, **record) -> None:
    folder.write(LEASE_FILE, json.dumps({"host": "ray-head-0", "machine": "ray-head-0 boot pid-ns", "pid": 57,
                                         "started": 1.0, "token": "theirs", "seen": time.time(), **record}).encode())


def test_a_second_driver_is_refused_while_the_first_runs_and_not_once_it_ended_or_was_killed(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    first = holder(folder)
    assert running_driver(folder).pid == first.pid
    assert refusal(folder) == f"{folder}: pid {first.pid} on this machine {REFUSED}"
    first.stdin.close()  # it ends: its lease goes with it, and the folder it made for it
    assert first.wait(timeout=60) == 0 and not Path(folder).exists() and running_driver(folder) is None

    killed = holder(folder)
    killed.kill()  # kill -9: its lease stays, naming a process that is a zombie until its parent waits for it
    while Path(f"/proc/{killed.pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z":
        time.sleep(0.05)
    assert folder.read(LEASE_FILE) is not None and running_driver(folder) is None
    (Path(folder) / "sharetune-spec.yaml").write_text("a search's")
    with Lease(folder) as held:
        held.confirm()
        assert running_driver(folder).pid == os.getpid()
        with Lease(folder) as again:  # a resume that starts its search's trials holds it once
            again.confirm()
        assert running_driver(folder).pid == os.getpid()
    assert folder.read(LEASE_FILE) is None and Path(folder).exists()  # the search's folder stays
    killed.wait(timeout=60)


def test_of_two_drivers_that_took_the_lease_at_once_the_one_whose_lease_stayed_goes_on(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    with pytest.raises(StateError) as refused, Lease(folder) as taken:
        write_lease(folder)  # another machine's driver, which read no lease either, wrote its own just after
        taken.confirm()
    assert re.fullmatch(rf"{folder}: pid 57 on ray-head-0, its lease rewritten \d s ago \(one not rewritten for 60 s is a "
                        rf"stopped driver's\) {re.escape(REFUSED)}", str(refused.value))
    assert json.loads(folder.read(LEASE_FILE))["token"] == "theirs"  # left as it is


def test_another_machines_lease_holds_until_it_goes_unwritten_for_a_minute(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    write_lease(folder, seen=time.time() - 5)
    assert re.fullmatch(rf"{folder}: pid 57 on ray-head-0, its lease rewritten [5-9] s ago \(one not rewritten for 60 s is "
                        rf"a stopped driver's\) {re.escape(REFUSED)}", refusal(folder))
    # a container that shares this host's name, with its own pids: its pid 57 is not this machine's
    write_lease(folder, host=socket.gethostname(), machine=f"{socket.gethostname()} another-boot 1", seen=time.time() - 5)
    assert re.search(f"pid 57 on {socket.gethostname()}, its lease rewritten [5-9] s ago", refusal(folder))
    write_lease(folder, seen=time.time() - lease.EXPIRES_S - 1)
    with Lease(folder) as held:
        held.confirm()
        assert running_driver(folder).pid == os.getpid()


@pytest.mark.parametrize("data", [
    b'{"host": "', b"[]", b"{}", b"\xff\xfe",  # cut short, not a lease
    json.dumps({"host": "h", "machine": "HERE", "pid": "x", "started": 0, "token": "t", "seen": 0}).encode(),
    json.dumps({"host": "h", "machine": "HERE", "pid": -1, "started": 0, "token": "t", "seen": 0}).encode(),
    json.dumps({"host": "h", "machine": "HERE", "pid": "SELF", "started": 1.0, "token": "t", "seen": 0}).encode(),  # a later process given its pid
])
def test_a_lease_that_names_no_running_driver_is_taken(tmp_path, data):
    folder = SearchFolder(tmp_path / "search")
    folder.write(LEASE_FILE, data.replace(b'"HERE"', json.dumps(this_machine()).encode())
                 .replace(b'"SELF"', str(os.getpid()).encode()))
    assert running_driver(folder) is None
    with Lease(folder) as held:
        held.confirm()
        assert running_driver(folder).pid == os.getpid()


def test_the_lease_is_rewritten_while_held_and_a_driver_that_lost_it_says_so_and_leaves_the_new_one(tmp_path, monkeypatch,
                                                                                                     caplog):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    folder = SearchFolder(tmp_path / "search")
    with caplog.at_level(logging.WARNING, logger=lease.__name__), Lease(folder) as held:
        held.confirm()
        first = running_driver(folder).seen
        deadline = time.monotonic() + 30
        while running_driver(folder).seen == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_driver(folder).seen > first
        # another machine's driver took it over (this one's beats went unwritten past EXPIRES_S, say)
        write_lease(folder)
        while "took this search over" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    (message,) = caplog.messages
    assert re.fullmatch(rf"{folder}: pid 57 on ray-head-0, its lease rewritten \d s ago \(one not rewritten for 60 s is a "
                        r"stopped driver's\) took this search over; their results may mix", message)
    assert json.loads(folder.read(LEASE_FILE))["token"] == "theirs"  # this driver's end left theirs
