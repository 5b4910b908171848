"""One driver per search folder: the lease a search's driver holds, with real processes holding it, real
kills, and leases written as another machine's driver leaves them. A `resume` of a running search, end
to end, is in test_search_cli.py."""

import json
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

HOLD = ("import sys\nfrom sharetune.search import lease\nfrom sharetune.search.storage import SearchFolder\n"
        "lease.HEARTBEAT_S = float(sys.argv[2])\n"
        "with lease.Lease(SearchFolder(sys.argv[1])) as held:\n    held.confirm()\n    print('held', flush=True)\n"
        "    sys.stdin.read()\n")
REFUSED = "is running this search; wait for it to end, or stop it (Ctrl-C) and resume then"


def holder(folder: SearchFolder, beat_s: float = lease.HEARTBEAT_S) -> subprocess.Popen:
    """A process that holds the folder's lease until its stdin closes, rewriting it every `beat_s`."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, folder, str(beat_s)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def refusal(folder: SearchFolder) -> str:
    with pytest.raises(StateError) as refused, Lease(folder):
        pytest.fail("a second driver ran")
    return str(refused.value)


def write_lease(folder: SearchFolder, **record) -> None:
    folder.write(LEASE_FILE, json.dumps({"host": "ray-head-0", "machine": "ray-head-0 boot pid-ns", "pid": 57,
                                         "started": 1.0, "token": "theirs", "seen": time.time(), "confirmed": True,
                                         **record}).encode())


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
    made = SearchFolder(tmp_path / "made")
    Path(made).mkdir()  # a user's, empty
    with Lease(made):
        pass
    assert Path(made).is_dir()


def test_of_two_drivers_that_took_the_lease_at_once_the_one_whose_lease_stayed_goes_on(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    with pytest.raises(StateError) as refused, Lease(folder) as taken:
        write_lease(folder, confirmed=False)  # another machine's driver, which read no lease either, wrote its own just after
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
    write_lease(folder, seen=time.time() + 30)  # its clock a little ahead
    assert REFUSED in refusal(folder)
    for seen in (time.time() - lease.EXPIRES_S - 1, time.time() + 3600, 1e300):  # not hours ahead: a damaged lease
        write_lease(folder, seen=seen)
        assert running_driver(folder) is None
    with Lease(folder) as held:
        held.confirm()
        assert running_driver(folder).pid == os.getpid()


@pytest.mark.parametrize("data", [
    b'{"host": "', b"[]", b"{}", b"\xff\xfe", b"[" * 100_000, b" " * 5000,  # cut short, not a lease, too large for one
    b'{"host": "h", "machine": "m", "pid": 1e400, "started": 0, "token": "t", "seen": 0, "confirmed": true}',
    json.dumps({"host": "h", "machine": "HERE", "pid": "x", "started": 0, "token": "t", "seen": 0, "confirmed": True}).encode(),
    json.dumps({"host": "h", "machine": "HERE", "pid": -1, "started": 0, "token": "t", "seen": 0, "confirmed": True}).encode(),
    json.dumps({"host": "h", "machine": "HERE", "pid": "SELF", "started": 1.0, "token": "t", "seen": 0, "confirmed": True}).encode(),  # a later process given its pid
])
def test_a_lease_that_names_no_running_driver_is_taken(tmp_path, data):
    folder = SearchFolder(tmp_path / "search")
    folder.write(LEASE_FILE, data.replace(b'"HERE"', json.dumps(this_machine()).encode())
                 .replace(b'"SELF"', str(os.getpid()).encode()))
    assert running_driver(folder) is None
    with Lease(folder) as held:
        held.confirm()
        assert running_driver(folder).pid == os.getpid()


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def test_the_lease_is_rewritten_while_held_and_a_driver_that_lost_it_stops_at_once(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    driver = holder(folder, beat_s=0.05)
    first = running_driver(folder)
    assert first.confirmed
    wait_for(lambda: running_driver(folder).seen > first.seen)
    folder.remove(LEASE_FILE)  # deleted: the next beat writes it again
    wait_for(lambda: folder.read(LEASE_FILE) is not None)
    # A resume that found it gone took it meanwhile; the running driver writes its own back, before the
    # resume confirms (once its Ray started), which then refuses the folder
    folder.remove(LEASE_FILE)
    with pytest.raises(StateError) as refused, Lease(folder) as late:
        wait_for(lambda: running_driver(folder).pid == driver.pid)
        late.confirm()
    assert f"pid {driver.pid} on this machine {REFUSED}" in str(refused.value) and driver.poll() is None
    write_lease(folder, confirmed=False)  # another machine's driver that has not confirmed: this one's goes back
    wait_for(lambda: running_driver(folder).pid == driver.pid)
    write_lease(folder, confirmed=True)  # one that confirmed (this one's beats went unwritten past EXPIRES_S, say)
    driver.wait(timeout=60)  # its stdin still open: it ends only by its heartbeat
    stderr = driver.stderr.read()
    assert driver.returncode == 130 and re.fullmatch(
        rf"error: {folder}: pid 57 on ray-head-0, its lease rewritten \d s ago \(one not rewritten for 60 s is a stopped "
        r"driver's\) took this search over, its lease in place of this driver's; this driver stopped at once, as kill -9 "
        r"stops one, and left the search to it\n", stderr), stderr
    assert json.loads(folder.read(LEASE_FILE))["token"] == "theirs"  # left to it


def test_a_new_search_checked_again_under_its_own_lease_names_no_driver(tmp_path):
    from sharetune.search.tuner import check_new
    from sharetune.spaces import SpecError

    folder = SearchFolder(tmp_path / "search")
    (Path(tmp_path) / "search").mkdir()
    (Path(folder) / "sharetune-spec.yaml").write_text("one that started and ended there meanwhile")
    with Lease(folder) as held, pytest.raises(SpecError) as refused:
        held.confirm()
        check_new(folder)
    assert str(refused.value) == (f"--name: {folder} already holds a search; choose another name, or continue that one "
                                  f"with `sharetune resume {folder}`")


def test_a_lease_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    (Path(folder) / LEASE_FILE).mkdir(parents=True)
    with pytest.raises(IsADirectoryError), Lease(folder):
        pytest.fail("taken")
    assert [p.name for p in Path(folder).iterdir()] == [LEASE_FILE]
