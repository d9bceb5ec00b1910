"""Helpers of the training and eval fault tests: a copy of the reference run, a tripwire that records
every process `pretrain` starts, and the one-line checks on stderr."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from reliability.harness import ROOT

# noise that is not ours and not an error: DeepSpeed's and torch's own warnings on the ranks' stderr
NOT_OURS = ("FutureWarning", "return func(*args, **kwargs)", "UserWarning", "warnings.warn")
SPAM = ("Traceback", "iostream", "inline_container", "ChildFailedError", "Signal 15", "KeyboardInterrupt",
        "torch.distributed.elastic")

_TRIPWIRE = '''
import os, subprocess
_log = os.environ.get("PRETRAIN_TEST_SPAWN_LOG")
if _log:
    _real = subprocess.Popen.__init__
    def _init(self, args, *a, **k):
        text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        with open(_log, "a") as f:
            f.write(text + "\\n")
        _real(self, args, *a, **k)
    subprocess.Popen.__init__ = _init
'''


def tripwire(tmp: Path) -> tuple[dict, Path]:
    """(env, log): run `pretrain` with ``env`` and every process it starts is a line of ``log``."""
    folder = tmp / "tripwire"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_TRIPWIRE)
    log = folder / "spawned.log"
    log.unlink(missing_ok=True)
    env = {"PRETRAIN_TEST_SPAWN_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), str(ROOT), os.environ.get("PYTHONPATH")]))}
    return env, log


def spawned(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.is_file() else []


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI in a subprocess; (result, wall seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc, time.monotonic() - start


def our_lines(stderr: str) -> list[str]:
    """stderr without blank lines and without other libraries' warnings."""
    return [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in NOT_OURS)]


def assert_one_line(stderr: str, *words: str, command: str = "train") -> str:
    """Exactly one line of ours on stderr, naming every word; no traceback or C++ spam anywhere."""
    lines = our_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"pretrain {command}: "), lines
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert not [s for s in SPAM if s in stderr], stderr[-3000:]
    return lines[0]


def copy_run(reference_run: Path, tmp: Path, name: str, **changes) -> tuple[Path, Path]:
    """(config, run_dir): the reference run's checkpoints under a new run_dir, with its config changed
    (``changes``: section → fields) and W&B off."""
    run_dir = tmp / name
    shutil.copytree(reference_run / "checkpoints", run_dir / "checkpoints", symlinks=True)
    raw = yaml.safe_load((reference_run / "config.yaml").read_text())
    raw["run_dir"] = str(run_dir)
    raw["tracking"]["mode"] = "disabled"
    for section, fields in changes.items():
        raw.setdefault(section, {}).update(fields)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(cfg, run_dir / "config.yaml")  # what eval and status read
    return cfg, run_dir


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def rows(run_dir: Path) -> list[dict]:
    import json

    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class Job:
    """A `pretrain` command started as a scheduler starts a job (its own session), stdout and stderr
    kept apart, so a test can signal it and read the one line it ends with."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict | None = None):
        from reliability.harness import descendants

        self._descendants = descendants
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                     stdout=self._out, stderr=self._err, start_new_session=True)
        self.seen: set[int] = set()
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        found = self._descendants(self.pid)
        self.seen.update(found)
        return found

    def ranks(self) -> list[int]:
        from reliability.harness import cmdline

        return [p for p in self.tree() if "pipeline.cli train" in cmdline(p) and "torch.distributed.run" not in cmdline(p)]

    def signal(self, signum: int) -> float:
        self.tree()
        os.kill(self.pid, signum)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.flush(), self._err.flush()

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def left_running(self, settle_s: float = 5.0) -> list[int]:
        from reliability.harness import alive

        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and any(alive(p) for p in self.seen | {self.pid}):
            time.sleep(0.05)
        return [p for p in self.seen | {self.pid} if alive(p)]

    def kill_all(self) -> None:
        from reliability.harness import alive, cmdline

        for p in {self.pid, *self.tree(), *self.seen}:
            if alive(p) and ("pipeline.cli" in cmdline(p) or "torch.distributed.run" in cmdline(p)):
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
        if self.proc.returncode is None:
            self.proc.wait(30)
        self._out.close(), self._err.close()
