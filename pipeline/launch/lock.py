"""A lease lock on a run directory: one `pretrain train` writes a run at a time.

Scheduled runs (cron, RayCronJob, scrontab) fire whether or not the previous firing finished; two
trainers on one run directory would interleave checkpoints. The holder writes ``run_dir/run.lock``
(JSON: host, pid, start time, lease expiry, a random token) and a heartbeat thread pushes the expiry
forward every ``heartbeat_s``. Anyone else finds a live lease and stops with `RunLocked`.

A lock whose holder died is taken over when it is *stale*: its lease expired (any host), or it names
this host and a process that no longer exists (same pid and start time), so a SIGKILLed trainer on
the same machine does not block the next firing for a whole lease.

Read-check-write steps happen under ``flock`` on ``run.lock.guard``, so two starters can never both
take a stale lock. Leases compare wall clocks: hosts sharing a run directory need NTP.

On an object store (``run_dir: s3://…``) there is no flock: the lease object is created with a
conditional PUT (``If-None-Match: *``), which exactly one starter wins. A store that ignores the
condition (checked once per process with a probe object) cannot give a safe lock: the run is
refused in one line unless the user turns the lock off (``launch.lock: false``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import ConfigError, LockHeld
from pipeline.launch.env import global_rank
from pipeline.objstore import ObjectStoreError, is_uri
from pipeline.rundir import RunDir
from pipeline.storage import StorageError, open_storage

LOCK_FILE = RunDir.LOCK
GUARD_FILE = RunDir.LOCK_GUARD
HELD_ENV = "PRETRAIN_RUN_LOCK_TOKEN"  # set for child ranks: the parent already holds the lock


class RunLocked(LockHeld):
    """Another live process holds the run directory's lease."""


@dataclass(frozen=True)
class LeaseInfo:
    host: str
    pid: int
    pid_start: str  # /proc start time of pid, "" where unknown: guards against pid reuse
    started_at: float
    expires_at: float
    token: str
    command: str = ""

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return (f"pid {self.pid} on {self.host} (started {started}, lease renewed until "
                f"{self.expires_at - now:+.0f} s from now)")


def _pid_start(pid: int) -> str:
    """Start time of a process in clock ticks since boot (Linux), "" elsewhere or when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _process_alive(pid: int, pid_start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not pid_start or not _pid_start(pid) or _pid_start(pid) == pid_start


def is_stale(info: LeaseInfo, now: float, host: str) -> bool:
    """True when nobody can still be holding ``info``'s lease."""
    if now >= info.expires_at:
        return True
    return info.host == host and not _process_alive(info.pid, info.pid_start)


def read_lease(run_dir: str | Path, lock_file: str = LOCK_FILE) -> LeaseInfo | None:
    store = open_storage(run_dir)
    if not store.exists(lock_file):
        return None
    try:
        raw = json.loads(store.read_text(lock_file))
        return LeaseInfo(**raw)
    except (StorageError, ObjectStoreError):  # released between the two calls
        return None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        # a half-written or foreign file: treat as expired rather than blocking the run forever
        return LeaseInfo(host="?", pid=-1, pid_start="", started_at=0.0, expires_at=0.0, token="corrupt")


class RunLock:
    """``with RunLock(run_dir, lease_s=120, heartbeat_s=20): train()`` — raises RunLocked when busy."""

    def __init__(self, run_dir: str | Path, lease_s: float, heartbeat_s: float,
                 on_lost: Callable[[LeaseInfo | None], None] | None = None, command: str = "",
                 lock_file: str = LOCK_FILE):
        if heartbeat_s * 2 > lease_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be at most half of lease_s ({lease_s})")
        self.remote = is_uri(run_dir)
        self.run_dir = str(run_dir).rstrip("/") if self.remote else Path(run_dir)
        # the lease's file (a dataset directory's is DatasetDir.LOCK) and its flock guard beside it
        self.lock_file, self.guard_file = lock_file, GUARD_FILE if lock_file == LOCK_FILE else f"{lock_file}.guard"
        self._store = open_storage(self.run_dir)
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        self.on_lost = on_lost or _terminate_self
        self.command = command
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.took_over: LeaseInfo | None = None  # the stale lease replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path | str:
        return self._store.path(self.lock_file)

    @contextlib.contextmanager
    def _guard(self):
        if self.remote:  # the conditional create is the guard (see `_take`)
            yield
            return
        with open(self._store.local_path(self.guard_file), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lease_json(self, started_at: float) -> str:
        info = LeaseInfo(self.host, os.getpid(), _pid_start(os.getpid()), started_at, time.time() + self.lease_s,
                         self.token, self.command)
        return json.dumps(asdict(info), indent=1) + "\n"

    def _write(self, started_at: float) -> None:
        # one writer at a time: every write happens under the guard (on a store: by the holder only)
        self._store.write_atomic(self.lock_file, self._lease_json(started_at))

    def _busy(self, current: LeaseInfo, now: float) -> RunLocked:
        return RunLocked(
            f"{self.run_dir} is being trained by {current.describe(now)}; a second trainer "
            f"would interleave checkpoints. Wait for it to finish, or, if that process is gone, "
            f"for its lease to expire (delete {self.path} only if you are sure it is dead)"
        )

    def _take(self, now: float) -> None:
        """On an object store: create the lease object only if it does not exist; a stale one is
        deleted and the create tried once more (a rival that wins that race holds the run)."""
        _check_conditional_writes(self._store)
        for _ in range(2):
            if self._store.create_exclusive(self.lock_file, self._lease_json(now)):
                return
            current = read_lease(self.run_dir, self.lock_file)
            if current is not None and not is_stale(current, now, self.host):
                raise self._busy(current, now)
            self.took_over = current
            self._store.delete(self.lock_file)
        current = read_lease(self.run_dir, self.lock_file)
        raise self._busy(current, now) if current else RunLocked(f"{self.path}: taken by another starter")

    def acquire(self) -> RunLock:
        self._store.makedirs()
        with self._guard():
            now = time.time()
            self._started_at = now
            if self.remote:
                self._take(now)
            else:
                current = read_lease(self.run_dir, self.lock_file)
                if current is not None and not is_stale(current, now, self.host):
                    raise self._busy(current, now)
                self.took_over = current
                self._write(now)
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> bool:
        with self._guard():
            current = read_lease(self.run_dir, self.lock_file)
            if current is None or current.token != self.token:
                return False
            self._write(self._started_at)
            return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ok = self._renew()
            except OSError as exc:  # a flaky shared filesystem: try again next beat, the lease has slack
                print(f"run lock: could not renew {self.path}: {exc}", flush=True)
                continue
            if not ok:
                self.on_lost(read_lease(self.run_dir, self.lock_file))
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._guard():
            current = read_lease(self.run_dir, self.lock_file)
            if current is not None and current.token == self.token:
                self._store.delete(self.lock_file)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_CONDITIONAL_OK: set[str] = set()


def _check_conditional_writes(store) -> None:
    """Refuse a store that ignores ``If-None-Match: *`` (a second conditional create of one probe
    object succeeds): its lock could be held twice. Checked once per process and bucket."""
    if store.bucket in _CONDITIONAL_OK:
        return
    probe = f"{LOCK_FILE}.probe-{uuid.uuid4().hex[:12]}"
    try:
        first, second = store.create_exclusive(probe, "probe"), store.create_exclusive(probe, "probe")
    finally:
        store.delete(probe)
    if first and second:
        raise ConfigError(f"{store.path(LOCK_FILE)}: this object store ignores conditional writes (If-None-Match), "
                          f"so the run lock cannot keep two trainers apart; use a store that supports them, or set "
                          f"launch.lock=false and make sure yourself that one trainer runs at a time")
    _CONDITIONAL_OK.add(store.bucket)


def _terminate_self(holder: LeaseInfo | None) -> None:
    """Default when the lease was lost (we stalled past it and someone took over): stop training."""
    who = holder.describe(time.time()) if holder else "nobody (the lock file was removed)"
    print(f"run lock: lost the lease on the run directory, now held by {who}; stopping", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def run_lock(run_dir: str | Path, lease_s: float, heartbeat_s: float, enabled: bool = True,
             command: str = "pretrain train"):
    """The lock a process takes around a whole training run; children learn of it through HELD_ENV.
    ``enabled`` False (``launch.lock: false``): no lock at all, the user keeps trainers apart."""
    if not enabled:
        return contextlib.nullcontext()
    return RunLock(run_dir, lease_s, heartbeat_s, command=command)


def rank_lock(run_dir: str | Path, lease_s: float, heartbeat_s: float, enabled: bool = True):
    """Under a launcher (srun, Ray Train, a user's torchrun): global rank 0 holds the lock, unless our
    own `pretrain train` parent already does (HELD_ENV). Other ranks hold nothing."""
    if not enabled or global_rank() != "0" or os.environ.get(HELD_ENV):
        return contextlib.nullcontext()
    return RunLock(run_dir, lease_s, heartbeat_s, command="pretrain train (rank 0)")


def budget_spent(cfg) -> str | None:
    """Why a (scheduled) firing has nothing to do, or None: the newest committed checkpoint is
    already at train.max_steps."""
    from pipeline.train.checkpoint import latest_committed

    newest = latest_committed(RunDir(cfg.run_dir).checkpoints, verify=False)
    if newest is not None and newest.step >= cfg.train.max_steps:
        return (f"{cfg.run_dir} is at step {newest.step}, train.max_steps is {cfg.train.max_steps}: "
                f"the budget is spent, nothing to do")
    return None
