"""`pretrain submit --to ray --schedule` for real: the crontab line it prints, run by a real cron
daemon (Debian's `cron`; tests/services/install_cron.sh installs it, the test starts it when none runs)
against a real token-protected Ray head.

Everything is read from what the firings left behind — checkpoints, metrics.jsonl, last_run.json and
RUN_DIR/schedule.log, where each firing appends what it printed — never from our functions. The lines
run in cron's bare environment (PATH=/usr/bin:/bin, no RAY_* variables, no PYTHONPATH): the address and
the token come from the env file the line sources.

The default run runs the printed command by hand (`sh -c`, in the same bare environment); the real
cron, one firing a minute, takes ~4 minutes and is `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import pretrain, tiny_overrides
from test_submit_ray import AUTH, ray_head  # noqa: F401  (a module-scoped Ray head of our own)

pytestmark = pytest.mark.e2e

CRON_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "SHELL": "/bin/sh",
            "LOGNAME": "root"}  # what cron gives a job


def _cron_binary() -> str | None:
    found = shutil.which("cron") or ("/usr/sbin/cron" if Path("/usr/sbin/cron").is_file() else None)
    return found if found and shutil.which("crontab") else None


def _running_cron() -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "cron":
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def cron_daemon():
    """A running cron daemon: the machine's, or one we start (and stop) ourselves."""
    cron = _cron_binary()
    if cron is None:
        pytest.skip("cron is not installed (run tests/services/install_cron.sh as root)")
    if _running_cron():
        yield None
        return
    if os.geteuid() != 0:
        pytest.skip("no cron daemon runs and only root can start one")
    daemon = subprocess.Popen([cron, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    if daemon.poll() is not None:
        pytest.skip(f"cron -f exited at once (code {daemon.returncode})")
    try:
        yield daemon
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


class Crontab:
    """This user's crontab with our lines added between markers; what was there before is restored."""

    def __init__(self):
        self.mark = f"pretrain-test-{uuid.uuid4().hex[:8]}"
        listed = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
        self.before = listed.stdout if listed.returncode == 0 else None

    def install(self, *lines: str) -> None:
        ours = "".join(f"{line}\n" for line in lines)
        table = (self.before or "") + f"# {self.mark} begin\n{ours}# {self.mark} end\n"
        subprocess.run(["crontab", "-"], input=table, text=True, check=True)

    def restore(self) -> None:
        if self.before is None:
            subprocess.run(["crontab", "-r"], capture_output=True)
        else:
            subprocess.run(["crontab", "-"], input=self.before, text=True, check=True)


def _schedule_line(ray_head: str, sets: list[str], max_steps: int, cron: str = "* * * * *") -> str:
    """What `pretrain submit --schedule` prints for the crontab (its last line)."""
    out = pretrain("submit", "configs/demo.yaml", "--to", "ray", "--address", ray_head, "--schedule", cron,
                   "--stage", "train", *sets, "--set", f"train.max_steps={max_steps}", env=AUTH).stdout
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"{cron} . "), out
    return line


def _prepared(corpus, tmp_path) -> list[str]:
    sets = tiny_overrides(tmp_path, f"[{{path: '{corpus[0]}'}}]") + [
        "--set", "train.nproc_per_node=1", "--set", "checkpoint.save_interval_steps=2"]
    pretrain("prepare", "configs/demo.yaml", *sets)
    return sets


def _read(log: Path) -> tuple[str, list[str]]:
    """The firings' log, and the end line of each firing's Ray job: 'ID: STATUS (exit code N)'."""
    text = log.read_text() if log.exists() else ""
    return text, [l.split("Ray job ", 1)[1] for l in text.splitlines() if l.startswith("Ray job ") and ": " in l]


def _steps(run_dir: Path) -> list[int]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def _wait_for(log: Path, done, timeout_s: float) -> tuple[str, list[str]]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text, ends = _read(log)
        if done(text, ends):
            return text, ends
        time.sleep(2)
    raise AssertionError(f"the firings did not get there within {timeout_s:.0f} s:\n{_read(log)[0][-4000:]}")


def test_the_printed_crontab_command_trains_in_crons_bare_environment(ray_head, corpus, tmp_path):
    sets = _prepared(corpus, tmp_path)
    line = _schedule_line(ray_head, sets, max_steps=4)
    command = line.split(" ", 5)[5]  # the five cron fields, then the command cron hands to /bin/sh
    assert sys.executable in command and "RAY_AUTH_TOKEN" not in command and AUTH["RAY_AUTH_TOKEN"] not in command
    fired = subprocess.run(["/bin/sh", "-c", command], env=CRON_ENV, capture_output=True, text=True, timeout=400)
    run_dir = tmp_path / "run"
    log = run_dir / "schedule.log"
    assert fired.returncode == 0, log.read_text()[-4000:] if log.exists() else fired.stderr
    text, ends = _read(log)
    assert len(ends) == 1 and ends[0].endswith(": SUCCEEDED (exit code 0)"), text[-4000:]
    assert (run_dir / "checkpoints/step_00000004/COMMIT").is_file()
    assert _steps(run_dir)[-1] == 4
    assert json.loads((run_dir / "last_run.json").read_text())["outcome"] == "finished"
    assert (run_dir / "config.yaml").is_file()  # the Ray driver leaves the config it ran
    # the follow-up command the firing printed runs as pasted, still with no RAY_* in the environment
    status = next(l for l in text.splitlines() if l.startswith("  status:")).split(":", 1)[1].strip()
    shown = subprocess.run(["/bin/sh", "-c", status], env=CRON_ENV, capture_output=True, text=True, timeout=120)
    job_id = ends[0].split(":", 1)[0]
    assert shown.returncode == 0 and f"Job '{job_id}' succeeded" in shown.stdout + shown.stderr, shown.stdout


@pytest.mark.slow
def test_cron_firings_train_resume_refuse_an_overlap_and_stop_at_the_budget(cron_daemon, ray_head, corpus,
                                                                           tmp_path):
    sets = _prepared(corpus, tmp_path)
    run_dir = tmp_path / "run"
    log = run_dir / "schedule.log"
    first, extended = _schedule_line(ray_head, sets, 4), _schedule_line(ray_head, sets, 8)
    crontab = Crontab()
    try:
        # minute 1: the same line in two crontabs (two login nodes) fires twice at once: one firing
        # trains 0 → 4, the other finds the run locked and its job ends with exit code 3
        crontab.install(first, first)
        # (a firing that outlives the minute meets the next ones: they are refused, or find the budget spent)
        text, ends = _wait_for(log, lambda text, ends: any(e.endswith(": SUCCEEDED (exit code 0)") for e in ends)
                               and any(e.endswith(": FAILED (exit code 3)") for e in ends), timeout_s=240)
        crontab.install(extended)  # the user raises train.max_steps and reinstalls the printed line
        assert "is being trained by" in text and "a second trainer would interleave checkpoints" in text
        assert (run_dir / "checkpoints/step_00000004/COMMIT").is_file() and _steps(run_dir) == [2, 4]
        # the next firing resumes from step 4 and trains to 8; the one after finds the budget spent
        spent = "train.max_steps is 8: the budget is spent, nothing to do"
        text, ends = _wait_for(log, lambda text, ends: spent in text and len(ends) >= 4, timeout_s=300)
        crontab.restore()
        assert _steps(run_dir) == [2, 4, 6, 8]  # resumed: steps 1-4 were not trained again
        assert (run_dir / "checkpoints/step_00000008/COMMIT").is_file()
        last = json.loads((run_dir / "last_run.json").read_text())
        assert last["outcome"] == "finished" and last["step"] == 8  # the spent firing took no lock, wrote nothing
        assert ends[-1].endswith(": SUCCEEDED (exit code 0)")  # doing nothing is a success
    finally:
        crontab.restore()
