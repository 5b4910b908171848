"""One driver per search folder: the lease a search's driver holds, with real processes holding it, real
kills, and leases written as another machine's driver leaves them. A `resume` of a running search, end
to end, is in test_search_cli.py."""

import json
import logging
import os
import subprocess
import sys
import time

import psutil
import pytest

from sharetune.search import lease
from sharetune.search.lease import LEASE_FILE, driving, running_driver
from sharetune.search.storage import SearchFolder, StateError

HOLD = ("import sys\nfrom sharetune.search.lease import driving\nfrom sharetune.search.storage import SearchFolder\n"
        "with driving(SearchFolder(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.read()\n")


def holder(folder: SearchFolder) -> subprocess.Popen:
    """A process that holds the folder's lease until its stdin closes."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def refusal(folder: SearchFolder) -> str:
    with pytest.raises(StateError) as refused, driving(folder):
        pytest.fail("a second driver ran")
    return str(refused.value)


def write_lease(folder: SearchFolder, **record) -> None:
    folder.write(LEASE_FILE, json.dumps(record).encode())


def test_a_second_driver_is_refused_while_the_first_runs_and_not_once_it_ended_or_was_killed(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    first = holder(folder)
    assert running_driver(folder).pid == first.pid
    assert refusal(folder) == (f"{folder}: pid {first.pid} on this machine is running this search; wait for it to end, "
                               "or stop it (Ctrl-C) and resume then")
    first.stdin.close()  # it ends: its lease goes with it
    assert first.wait(timeout=60) == 0 and folder.read(LEASE_FILE) is None and running_driver(folder) is None

    killed = holder(folder)
    killed.kill()  # kill -9: its lease stays, naming a process that is a zombie until its parent waits for it
    while psutil.Process(killed.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    assert folder.read(LEASE_FILE) is not None and running_driver(folder) is None
    with driving(folder):
        assert running_driver(folder).pid == os.getpid()
        with driving(folder):  # a resume that starts its search's trials holds it once
            pass
        assert running_driver(folder).pid == os.getpid()
    assert folder.read(LEASE_FILE) is None
    killed.wait(timeout=60)


def test_another_machines_lease_holds_until_it_goes_unwritten_for_a_minute(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    write_lease(folder, host="ray-head-0", pid=57, started=1.0, token="theirs", seen=time.time() - 5)
    assert refusal(folder) == (f"{folder}: pid 57 on ray-head-0, its lease rewritten 5 s ago (one not rewritten for "
                               "60 s is a stopped driver's) is running this search; wait for it to end, or stop it "
                               "(Ctrl-C) and resume then")
    write_lease(folder, host="ray-head-0", pid=57, started=1.0, token="theirs", seen=time.time() - lease.EXPIRES_S - 1)
    with driving(folder):
        assert running_driver(folder).pid == os.getpid()


@pytest.mark.parametrize("data", [
    b'{"host": "', b"[]", b"{}", b"\xff\xfe",  # cut short, not a lease
    json.dumps({"host": "HERE", "pid": "x", "started": 0, "token": "t", "seen": 0}).encode(),
    json.dumps({"host": "HERE", "pid": -1, "started": 0, "token": "t", "seen": 0}).encode(),
    json.dumps({"host": "HERE", "pid": "SELF", "started": 1.0, "token": "t", "seen": 0}).encode(),  # a later process given its pid
])
def test_a_lease_that_names_no_running_driver_is_taken(tmp_path, data):
    import socket

    folder = SearchFolder(tmp_path / "search")
    folder.write(LEASE_FILE, data.replace(b'"HERE"', json.dumps(socket.gethostname()).encode())
                 .replace(b'"SELF"', str(os.getpid()).encode()))
    assert running_driver(folder) is None
    with driving(folder):
        assert running_driver(folder).pid == os.getpid()


def test_the_lease_is_rewritten_while_held_and_a_driver_that_lost_it_says_so_and_leaves_the_new_one(tmp_path, monkeypatch,
                                                                                                     caplog):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    folder = SearchFolder(tmp_path / "search")
    with caplog.at_level(logging.WARNING, logger=lease.__name__), driving(folder):
        first = running_driver(folder).seen
        deadline = time.monotonic() + 30
        while running_driver(folder).seen == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_driver(folder).seen > first
        # another machine's driver took it over (this one's beats went unwritten past EXPIRES_S, say)
        write_lease(folder, host="ray-head-0", pid=57, started=1.0, token="theirs", seen=time.time())
        while "took this search over" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert caplog.messages == [f"{folder}: pid 57 on ray-head-0, its lease rewritten 0 s ago (one not rewritten for 60 s "
                               "is a stopped driver's) took this search over; their results may mix"]
    assert json.loads(folder.read(LEASE_FILE))["token"] == "theirs"  # this driver's end left theirs
