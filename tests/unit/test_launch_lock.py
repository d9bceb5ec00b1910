"""The run-directory lease lock: one holder at a time, stale leases taken over, heartbeats renew."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.launch import lock
from pipeline.launch.lock import HELD_ENV, LOCK_FILE, RunLock, RunLocked, read_lease

pytestmark = pytest.mark.unit


def _forge(run_dir, **fields):
    """Write a lease as another holder would have left it."""
    info = {"host": "other-host", "pid": 4242, "pid_start": "", "started_at": time.time() - 60,
            "expires_at": time.time() + 60, "token": "someone-else", "command": "pretrain train"}
    info.update(fields)
    (run_dir / LOCK_FILE).write_text(json.dumps(info))


def test_second_holder_is_refused_while_the_lease_is_live(tmp_path):
    with RunLock(tmp_path, lease_s=30, heartbeat_s=5) as first:
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path, lease_s=30, heartbeat_s=5).acquire()
        assert read_lease(tmp_path).token == first.token
    assert read_lease(tmp_path) is None  # released: the file is gone
    with RunLock(tmp_path, lease_s=30, heartbeat_s=5):
        pass


def test_a_foreign_hosts_lease_blocks_until_it_expires(tmp_path):
    _forge(tmp_path, expires_at=time.time() + 1.0)
    with pytest.raises(RunLocked, match="other-host"):
        RunLock(tmp_path, lease_s=30, heartbeat_s=5).acquire()
    time.sleep(1.1)
    with RunLock(tmp_path, lease_s=30, heartbeat_s=5) as taken:
        assert taken.took_over is not None and taken.took_over.token == "someone-else"


def test_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _forge(tmp_path, host=lock.socket.gethostname(), pid=dead.pid, expires_at=time.time() + 3600)
    with RunLock(tmp_path, lease_s=30, heartbeat_s=5) as taken:
        assert taken.took_over.pid == dead.pid


def test_a_live_process_on_this_host_holds_even_past_pid_checks(tmp_path):
    _forge(tmp_path, host=lock.socket.gethostname(), pid=os.getppid(), expires_at=time.time() + 3600,
           pid_start=lock._pid_start(os.getppid()))
    with pytest.raises(RunLocked):
        RunLock(tmp_path, lease_s=30, heartbeat_s=5).acquire()


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    # same pid, but a different process start time: the original holder is gone
    _forge(tmp_path, host=lock.socket.gethostname(), pid=os.getpid(), pid_start="1",
           expires_at=time.time() + 3600)
    with RunLock(tmp_path, lease_s=30, heartbeat_s=5) as taken:
        assert taken.took_over.pid_start == "1"


def test_heartbeat_pushes_the_expiry_forward(tmp_path):
    with RunLock(tmp_path, lease_s=0.6, heartbeat_s=0.1):
        first = read_lease(tmp_path).expires_at
        time.sleep(0.8)  # longer than the lease: only renewals keep it
        current = read_lease(tmp_path)
        assert current.expires_at > first
        assert not lock.is_stale(current, time.time(), "other-host")


def test_losing_the_lease_calls_on_lost(tmp_path):
    lost = threading.Event()
    held = RunLock(tmp_path, lease_s=0.6, heartbeat_s=0.1, on_lost=lambda holder: lost.set()).acquire()
    _forge(tmp_path)  # someone took over while we stalled
    assert lost.wait(2.0)
    held.release()
    assert read_lease(tmp_path).token == "someone-else"  # release leaves the new holder's lease alone


def test_a_corrupt_lock_file_does_not_block_forever(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{not json")
    with RunLock(tmp_path, lease_s=30, heartbeat_s=5) as taken:
        assert taken.took_over.token == "corrupt"


def test_heartbeat_must_fit_twice_in_the_lease(tmp_path):
    with pytest.raises(ValueError, match="at most half"):
        RunLock(tmp_path, lease_s=10, heartbeat_s=6)


def test_rank_lock_only_on_rank_zero_and_only_without_a_holding_parent(tmp_path, monkeypatch):
    monkeypatch.delenv(HELD_ENV, raising=False)
    monkeypatch.setenv("RANK", "1")
    assert not isinstance(lock.rank_lock(tmp_path, 30, 5), RunLock)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(lock.rank_lock(tmp_path, 30, 5), RunLock)
    monkeypatch.setenv(HELD_ENV, "parent-token")
    assert not isinstance(lock.rank_lock(tmp_path, 30, 5), RunLock)
    monkeypatch.delenv(HELD_ENV)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not isinstance(lock.rank_lock(tmp_path, 30, 5), RunLock)
