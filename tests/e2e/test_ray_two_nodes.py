"""`pretrain submit --to ray --wait` on a real two-node Ray cluster (tests/services/start_cluster.sh):
the Ray head runs inside pt-node1 (10.78.0.1, dashboard and Jobs API on :8265), a Ray worker node
inside pt-node2 (10.78.0.2) joins it; each offers one CPU, so Ray Train's two workers (launch.nodes=2,
one CPU rank per node) land one on each node. The submission is typed on this machine, the login
node (10.78.0.254), as a user would; the cluster uses token authentication, and the follow-up
commands `submit` prints are then run exactly as printed, in an environment without the address or
the token.

Shared folder: run and data live under /srv/pretrain-shared (the one writable folder both nodes see).

- an uninterrupted run (also the reference of the recovery run's losses);
- recovery: with launch.max_restarts=1, SIGKILL of the Ray Train worker on pt-node2 after the first
  commit; Ray Train (FailureConfig(max_failures=1)) restarts the group, it resumes from the last
  COMMIT and the job ends SUCCEEDED with the reference's losses.

Every step sleeps PRETRAIN_TEST_STEP_SLEEP_S (tests/dist/slow_steps on the Ray nodes' PYTHONPATH,
which Ray workers inherit from their raylet), so the kill lands between two commits; both runs sleep
alike. The Ray processes started here are ended by their process group and by the marker in their
environment or their temp dir (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, pretrain, write_corpus
from helpers.recovery import first_step_after, kill_all, losses, restarts, trained_step, wait_for
from pipeline.train import checkpoint as ckpt

BASE = Path("/var/lib/pretrain-cluster")
SHARED = Path("/srv/pretrain-shared")
NODES = ("pt-node1", "pt-node2")
ADDRS = ("10.78.0.1", "10.78.0.2")
BIN = Path(sys.executable).parent
HEAD = f"http://{ADDRS[0]}:8265"
STEPS = 24
STEP_SLEEP_S = "0.3"
MARK = "PRETRAIN_TEST_RAY_2NODE"  # in the environment of every process of our Ray nodes, and only ours
# the cluster's token: the head, the worker node and every client must carry it
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _holder(node: str) -> int | None:
    try:
        pid = int((BASE / f"{node}.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _cluster_problem() -> str | None:
    if not (BIN / "ray").is_file():
        return f"no `ray` next to {sys.executable}"
    if os.geteuid() != 0 or not all(_holder(n) for n in NODES) or not SHARED.is_dir():
        return "no two-node cluster (run tests/services/start_cluster.sh as root)"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem()))]


def on_node(node: str, *cmd: str) -> list[str]:
    return ["nsenter", "-t", str(_holder(node)), "-n", "-u", "-m", "--", *cmd]


def _net_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _ours(proc: Path, mark: str, temp_dir: str) -> bool:
    """A process of our Ray nodes: our marker in its environment, or our temp dir in its command line
    or open files (Ray's agents rename themselves and overwrite their environment block)."""
    try:
        if mark.encode() in (proc / "environ").read_bytes().split(b"\0"):
            return True
        if temp_dir.encode() in (proc / "cmdline").read_bytes():
            return True
        return any(os.readlink(fd).startswith(temp_dir) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen], mark: str, temp_dir: str) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    nets = {_net_ns(_holder(n)) for n in NODES}
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 3.0)):
        deadline = time.monotonic() + grace
        while True:
            pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()
                    and _net_ns(p.name) in nets and _ours(p, mark, temp_dir)]
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not pids:
            break
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _ray_start(node: str, addr: str, env: dict, *args: str) -> subprocess.Popen:
    cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={addr}", "--num-cpus=1", "--num-gpus=0",
           "--disable-usage-stats", *args]
    return subprocess.Popen(on_node(node, "env", *[f"{k}={v}" for k, v in env.items()], *cmd),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_two_nodes(env: dict, timeout: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline, out = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        out = subprocess.run(on_node(NODES[0], "env", *[f"{k}={v}" for k, v in env.items()], sys.executable, "-c",
                                     probe, f"{ADDRS[0]}:6379"), capture_output=True, text=True, cwd="/")
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == ["2"]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster did not reach 2 nodes: {out and out.stdout[-500:]} {out and out.stderr[-1500:]}")


@pytest.fixture(scope="module")
def ray_cluster():
    """Head in pt-node1, worker node in pt-node2; the Jobs API address."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    mark, temp_dir = f"{MARK}={tag}", f"/tmp/rt2-{tag}"  # short: Ray's socket paths have a length limit
    env = {MARK: tag, **AUTH, "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "PYTHONPATH": str(ROOT / "tests" / "dist" / "slow_steps"), "PRETRAIN_TEST_STEP_SLEEP_S": STEP_SLEEP_S}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_ray_start(NODES[0], ADDRS[0], env, "--head", "--port=6379", "--include-dashboard=true",
                                "--dashboard-host=0.0.0.0", "--dashboard-port=8265", f"--temp-dir={temp_dir}"))
        procs.append(_ray_start(NODES[1], ADDRS[1], env, f"--address={ADDRS[0]}:6379"))
        _wait_for_two_nodes(env)
        yield HEAD
    finally:
        _stop(procs, mark, temp_dir)
        for node in NODES:  # the nodes' private /tmp
            subprocess.run(on_node(node, "rm", "-rf", temp_dir), capture_output=True)


@pytest.fixture(scope="module")
def shared():
    """This module's folder on the one folder both nodes see."""
    root = SHARED / f"ray-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    write_corpus(root / "raw" / "docs.jsonl", 400)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _submit(shared: Path, run: Path, *extra: str) -> list[str]:
    """The command a user types (after `pretrain`)."""
    sets = [f"run_dir={run}", f"data.output_dir={shared / 'data'}",
            f"data.sources=[{{path: '{shared / 'raw' / 'docs.jsonl'}'}}]", "data.tokenizer.vocab_size=1024",
            "launch.nodes=2", "train.nproc_per_node=1", "train.seq_len=64", "train.micro_batch_size_per_gpu=4",
            "train.global_batch_size=8", f"train.max_steps={STEPS}", "train.log_interval_steps=1",
            "checkpoint.save_interval_steps=4", "checkpoint.keep_last=100", "eval.max_samples=16",
            "eval.micro_batch_size=4", "tracking.mode=disabled", *extra]
    return ["submit", "configs/demo.yaml", "--to", "ray", "--address", HEAD, "--wait",
            *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def reference(ray_cluster, shared) -> tuple[Path, str]:
    """The uninterrupted two-node run: prepare on the cluster, train 24 steps, eval; and what it printed."""
    run = shared / "reference"
    started = time.monotonic()
    done = pretrain(*_submit(shared, run), env=AUTH, timeout=480, check=False)
    print(f"\n[two-node Ray] submit --wait of the reference run: {time.monotonic() - started:.1f} s")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "SUCCEEDED" in out, out[-6000:]
    return run, out


def _printed(out: str, label: str) -> str:
    """The command after ``label`` in what submit printed, as a user would paste it."""
    line = next(x for x in out.splitlines() if x.strip().startswith(label))
    return line.split(":", 1)[1].strip()


def test_submit_wait_trains_across_both_nodes_and_the_printed_commands_run_as_pasted(reference, tmp_path):
    run, out = reference
    job_id = out.split("submitted Ray job ")[1].split()[0]
    assert f"Ray job {job_id}: SUCCEEDED (exit code 0)" in out
    assert "ray train: 2 workers (2 node(s) × 1 CPU ranks)" in out and "world size 2" in out
    # the two Ray Train workers ran one on each node: their lines in the job log carry each node's address
    ranks = dict(re.findall(r"- \(ip=([\d.]+), pid=\d+\) world_rank=(\d)", out))
    assert sorted(ranks) == sorted(ADDRS), (ranks, out[-4000:])
    latest = ckpt.latest_committed(run / "checkpoints")
    state = latest.trainer_state()
    assert latest.step == STEPS and state["world_size"] == 2 and len(set(state["sample_digests"])) == 2
    assert (latest.path / "eval.json").is_file() and (run / "config.yaml").is_file()

    # the follow-up commands, pasted into a shell that has neither RAY_ADDRESS nor the token
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PATH": "/usr/bin:/bin"}
    logs = subprocess.run(["sh", "-c", _printed(out, "follow its logs:")], capture_output=True, text=True,
                          env=bare, cwd=tmp_path, timeout=120)
    assert logs.returncode == 0 and "world size 2" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]
    status = subprocess.run(["sh", "-c", _printed(out, "status:")], capture_output=True, text=True, env=bare,
                            cwd=tmp_path, timeout=120)
    assert status.returncode == 0 and "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr


def _node2_workers() -> list[int]:
    """The Ray Train worker processes on pt-node2 (in its network namespace, named ray::RayTrainWorker)."""
    net = _net_ns(_holder(NODES[1]))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or _net_ns(proc.name) != net:
            continue
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_killed_worker_node_restarts_the_group_and_finishes_with_the_same_losses(ray_cluster, shared, reference, capsys):
    run = shared / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *_submit(shared, run, "launch.max_restarts=1")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **AUTH})
    try:
        first = run / "checkpoints" / "step_00000004" / "COMMIT"
        wait_for(lambda: (first.is_file() and trained_step(run) >= 5) or proc.poll() is not None, 300, "the first commit")
        victims = wait_for(_node2_workers, 30, "pt-node2's Ray Train worker")
        killed_at = kill_all(victims)
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "SUCCEEDED (exit code 0)" in out, out[-6000:]
    step, took = first_step_after(run, killed_at)
    with capsys.disabled():
        print(f"\n[two-node Ray] SIGKILL of pt-node2's Ray Train worker → first step after it "
              f"(step {step}): {took:.1f} s")
    assert [n for _, n in restarts(run)] == [1]
    assert "automatic restart 1 of 1 (launch.max_restarts)" in out
    assert losses(run) == losses(reference[0])
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["world_size"] == 2 and state["step"] == STEPS
