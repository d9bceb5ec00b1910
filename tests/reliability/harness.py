"""Crash harness: run `pretrain train` as its own process tree, kill it at chosen moments, restart it.

A trainer is started the way a scheduler starts a job: ``pretrain train`` in a new session, so the
CLI and the torchrun it starts share one process group (the ranks get their own sessions from
torchrun). A crash is ``os.killpg(SIGKILL)`` on that group; the ranks must follow within seconds.

Two kinds of moments:

- *timed*: wait for an observable event (a step logged in metrics.jsonl, a ``.tmp-step_N``
  directory appearing), optionally sleep a seeded random delay, then kill;
- *injected*: ``faults/sitecustomize.py`` is put on the ranks' PYTHONPATH with ``PRETRAIN_FAULT``
  naming a point inside the checkpoint commit (e.g. after the rename, before ``latest``); rank 0
  freezes itself there (SIGSTOP) and leaves a marker file, and the harness kills the tree while it
  is frozen, so windows of microseconds are hit every time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FAULTS_DIR = Path(__file__).resolve().parent / "faults"

# the tiniest run that still has several checkpoints: 8 steps, a commit every 2
TINY = {
    "model": {"max_seq_len": 64},
    "train": {"seq_len": 32, "micro_batch_size_per_gpu": 2, "global_batch_size": 4, "max_steps": 8,
              "log_interval_steps": 1, "nproc_per_node": 2, "zero_stage": 2},
    "checkpoint": {"save_interval_steps": 2, "keep_last": 2},
    "eval": {"max_samples": 8, "micro_batch_size": 2},
    "tracking": {"mode": "disabled"},
    "launch": {"lock_lease_s": 60.0, "lock_heartbeat_s": 5.0},
}
SAVE_STEPS = (2, 4, 6, 8)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, run_dir: Path, data_dir: Path, sources: Path, **sections) -> Path:
    """A self-contained YAML config (no `base:`) for the tiny run, with per-section overrides."""
    from pipeline.config import load_config, to_yaml

    raw = _merge(yaml.safe_load(to_yaml(load_config(ROOT / "configs" / "demo.yaml"))), TINY)
    raw = _merge(raw, {"run_dir": str(run_dir), "data": {"output_dir": str(data_dir),
                       "sources": [{"path": str(sources)}], "tokenizer": {"vocab_size": 512}}})
    raw = _merge(raw, sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- process trees


def children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out = []
    for c in children(pid):
        out += [c, *descendants(c)]
    return out


def alive(pid: int) -> bool:
    """Running or stopped (a zombie counts as dead: it holds no files and runs no code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for(predicate, timeout: float, interval: float = 0.005, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Trainer:
    """One `pretrain train` process tree, started in its own session."""

    def __init__(self, config: Path, log: Path, env: dict | None = None, fault: str | None = None,
                 args: tuple[str, ...] = ()):
        self.config, self.log, self.fault = Path(config), Path(log), fault
        self.marker = self.log.with_suffix(".fault")
        self.marker.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        if fault:
            env.update(PRETRAIN_FAULT=fault, PRETRAIN_FAULT_MARKER=str(self.marker),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(FAULTS_DIR), env.get("PYTHONPATH")])))
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", str(self.config), *args],
            cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.seen: set[int] = set()  # every descendant observed, for the no-orphans check

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        found = descendants(self.pid)
        self.seen.update(found)
        return found

    def ranks(self) -> list[int]:
        """Worker processes (children of torchrun running pipeline.cli)."""
        return [p for p in self.tree() if "pipeline.cli train" in cmdline(p) and "torch.distributed.run" not in cmdline(p)
                and p not in children(self.pid)]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._out.close()

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")

    def crash(self, run_dir: Path, settle_s: float = 3.0) -> tuple[list[int], list[str]]:
        """SIGKILL the job's process group (CLI + torchrun), as a scheduler or the OOM killer would.

        Returns what went on without the launcher during ``settle_s``: the processes still alive
        (they are killed then, so nothing leaks into the next trial) and the files under ``run_dir``
        written after the kill. Both must be empty: ranks die with their launcher."""
        launcher = [self.pid, *children(self.pid)]  # the CLI and its torchrun: this process group
        self.tree()
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()
        wait_for(lambda: not any(alive(p) for p in launcher), 10, 0.01, "the launcher to die")
        time.sleep(0.1)  # ranks that die with their launcher are gone by now
        at_kill = files_state(run_dir)
        try:
            wait_for(lambda: not any(alive(p) for p in self.seen), settle_s, 0.05, "the ranks to die")
        except TimeoutError:
            pass
        time.sleep(0.5)
        survivors = [p for p in self.seen if alive(p)]
        self.kill_all()
        after = files_state(run_dir)
        changed = sorted(k for k in at_kill.keys() | after.keys() if at_kill.get(k) != after.get(k))
        return survivors, changed

    def kill_all(self) -> None:
        """Cleanup: SIGKILL every process of the tree, the ranks' own sessions included."""
        for p in {self.pid, *self.tree(), *self.seen}:
            if alive(p) and ("pipeline.cli" in cmdline(p) or "torch.distributed.run" in cmdline(p)):
                try:  # only our own trainers' processes (a recycled pid runs something else)
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.returncode is None:
            self.proc.wait(30)
        if not self._out.closed:
            self._out.close()

    def fault_hit(self) -> bool:
        return self.marker.is_file()


# ---------------------------------------------------------------- what a run left behind


def train_losses(run_dir: Path, from_line: int = 0) -> list[tuple[int, float]]:
    """(step, train/loss) for each logged training step, in file order, from the given line on."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines()[from_line:]:
        if not line.strip():
            continue
        rec = json.loads(line)
        if "train/loss" in rec:
            rows.append((rec["step"], rec["train/loss"]))
    return rows


def files_state(run_dir: Path) -> dict[str, tuple[int, int]]:
    """relative path → (size, mtime_ns) of every file under run_dir."""
    out = {}
    for p in Path(run_dir).rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file():
            out[str(p.relative_to(run_dir))] = (st.st_size, st.st_mtime_ns)
    return out


def metrics_lines(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def logged_steps(run_dir: Path) -> int:
    rows = train_losses(run_dir)
    return max((s for s, _ in rows), default=0)


def checkpoint_dirs(run_dir: Path) -> dict[str, bool]:
    """Every step_* / .tmp-step_* directory under checkpoints/ → whether it carries COMMIT."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    return {p.name: (p / "COMMIT").is_file() for p in root.iterdir()
            if p.is_dir() and p.name.removeprefix(".tmp-").startswith("step_")}


# ---------------------------------------------------------------- trials


@dataclass(frozen=True)
class Trial:
    """One seeded crash: where to kill, and the parameters of that moment."""

    seed: int
    kind: str  # see KINDS
    step: int
    delay_s: float

    def describe(self) -> str:
        return f"seed {self.seed}: {self.kind} at step {self.step} (+{self.delay_s * 1000:.0f} ms)"


KINDS = (
    "in_step",          # timed: after step N is logged, a random delay: inside a later step or a save
    "in_tmp_write",     # timed: as soon as .tmp-step_N appears (ranks are writing the checkpoint)
    "before_commit",    # injected: step_N renamed into place, COMMIT not yet written
    "commit_unrenamed", # injected: COMMIT.tmp written and fsynced, not yet renamed to COMMIT
    "before_latest",    # injected: COMMIT written, `latest` still names the previous checkpoint
    "in_retention",     # injected: deleting the oldest committed checkpoint, half of its files gone
)


def make_trial(seed: int, kind: str | None = None) -> Trial:
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    if kind == "in_step":
        step, delay = rng.randint(1, 7), rng.uniform(0.0, 0.15)
    elif kind == "in_tmp_write":
        step, delay = rng.choice(SAVE_STEPS), rng.uniform(0.0, 0.02)
    elif kind == "in_retention":
        step, delay = rng.choice(SAVE_STEPS[2:]), 0.0  # keep_last 2: the first deletion is at step 6
    else:
        step, delay = rng.choice(SAVE_STEPS), 0.0
    return Trial(seed, kind, step, delay)


def crash_at(trainer: Trainer, run_dir: Path, trial: Trial, timeout: float = 240.0) -> None:
    """Wait for the trial's moment, then crash the trainer (it must not have finished by then)."""
    ckpts = Path(run_dir) / "checkpoints"
    if trial.kind == "in_step":
        wait_for(lambda: logged_steps(run_dir) >= trial.step or trainer.proc.poll() is not None,
                 timeout, what=f"step {trial.step} to be logged")
    elif trial.kind == "in_tmp_write":
        tmp = ckpts / f".tmp-step_{trial.step:08d}"
        wait_for(lambda: tmp.is_dir() or trainer.proc.poll() is not None, timeout, 0.002, f"{tmp.name}")
    else:
        wait_for(lambda: trainer.fault_hit() or trainer.proc.poll() is not None, timeout, 0.01,
                 f"fault {trial.kind} at step {trial.step}")
    if trainer.fault_hit() and trainer.marker.read_text().startswith("hook-error"):
        trainer.kill_all()
        raise AssertionError(f"{trial.describe()}: the fault hook could not install: {trainer.marker.read_text()}")
    if trainer.proc.poll() is not None:
        raise AssertionError(f"{trial.describe()}: the trainer exited ({trainer.proc.returncode}) before the "
                             f"crash moment\n{trainer.output()[-3000:]}")
    time.sleep(trial.delay_s)
    survivors, written = trainer.crash(run_dir)
    assert not survivors and not written, (
        f"{trial.describe()}: after the launcher was killed, ranks {survivors} kept running and wrote {written}")


def restart_and_compare(reference, cfg: Path, run_dir: Path, resume_step: int, label: str) -> str:
    """Run the same command again to completion and compare with the uninterrupted ``reference``:
    resumed at ``resume_step``, the steps after it re-run in order, every logged loss (before and
    after the interruption) bitwise equal, and the same final weights and sample digests."""
    from pipeline.data.shards import sha256_file
    from pipeline.train import checkpoint as ckpt

    lines_before = metrics_lines(run_dir)
    trainer = Trainer(cfg, run_dir.parent / f"{run_dir.name}.restart.log")
    try:
        rc = trainer.wait(600)
    finally:
        trainer.kill_all()
    out = trainer.output()
    assert rc == 0, f"{label}: restart exited {rc}\n{out[-4000:]}"
    if resume_step == 8:  # the crash came after the last commit: nothing is left to do
        assert "nothing to do" in out, f"{label}: restart after the final commit\n{out[-3000:]}"
    elif resume_step:
        want = f"resumed from {run_dir / 'checkpoints' / ckpt.tag_for(resume_step)} at step {resume_step}"
        assert want in out, f"{label}: expected '{want}'\n{out[-3000:]}"
    else:
        assert "resumed from" not in out, f"{label}: resumed although nothing was committed"
    rerun = [s for s, _ in train_losses(run_dir, from_line=lines_before)]
    assert rerun == list(range(resume_step + 1, 9)), f"{label}: steps after restart {rerun}"
    for step, loss in train_losses(run_dir):
        assert loss == reference.losses[step], (
            f"{label}: step {step} loss {loss!r} != uninterrupted {reference.losses[step]!r}")
    final = ckpt.latest_committed(run_dir / "checkpoints")
    assert final.step == 8 and (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip() == final.tag
    state = final.trainer_state()
    assert state["consumed_samples"] == reference.final_state["consumed_samples"]
    assert state["sample_digests"] == reference.final_state["sample_digests"], f"{label}: a sample was skipped or repeated"
    assert sha256_file(final.path / "model.safetensors") == reference.final_weights_sha256, f"{label}: other weights"
    left = checkpoint_dirs(run_dir)
    assert left == {ckpt.tag_for(6): True, ckpt.tag_for(8): True}, f"{label}: debris left behind: {left}"
    return out
