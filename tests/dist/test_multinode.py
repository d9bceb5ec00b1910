"""Multi-node for real on one machine: two network namespaces joined by a veth pair are two "nodes"
that can reach each other only over 10.77.0.1 ↔ 10.77.0.2.

- torchrun: one `torchrun --nnodes 2` per namespace, rendezvous on the first namespace's address;
- Ray: a head in one namespace, a worker node joining from the other, and `pretrain train --backend
  ray --num-workers 2` whose TorchTrainer places one worker on each (each Ray node offers one CPU).

Both must train and commit a checkpoint with world size 2. Needs root (ip netns); the namespaces
and the Ray processes started here are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.netns import veth_pair

from pipeline.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IFACE = "p77"  # the veth end is renamed to this in both namespaces, so one GLOO_SOCKET_IFNAME fits both
ADDRS = ("10.77.0.1", "10.77.0.2")

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2 (`ip netns`)"),
]


@pytest.fixture
def two_nodes():
    with veth_pair("77", IFACE, ADDRS) as names:
        yield names


def in_ns(ns: str, *cmd: str) -> list[str]:
    # RAY_AUTH_MODE: the head, the worker node and the driver must agree; token auth would need the
    # head's token shipped to the others, which is beside the point here
    return ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={IFACE}", "OMP_NUM_THREADS=1",
            "RAY_AUTH_MODE=disabled", f"PATH={BIN}:{os.environ['PATH']}", *cmd]


def short_run(run: Path) -> list[str]:
    sets = [f"run_dir={run}", "train.max_steps=2", "checkpoint.save_interval_steps=2", "tracking.mode=disabled",
            "train.seq_len=32", "train.micro_batch_size_per_gpu=2", "eval.max_samples=8", "eval.micro_batch_size=2"]
    return [a for s in sets for a in ("--set", s)]


def assert_two_node_checkpoint(run: Path, out: str) -> None:
    latest = ckpt.latest_committed(run / "checkpoints")
    assert latest is not None, out[-4000:]
    state = latest.trainer_state()
    assert latest.step == 2 and state["world_size"] == 2 and len(set(state["sample_digests"])) == 2


def test_torchrun_across_two_network_namespaces_trains_and_commits(trained_run, two_nodes, tmp_path):
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            in_ns(ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                  "--nproc-per-node", "1", "--master-addr", ADDRS[0], "--master-port", "29677",
                  "-m", "pipeline.cli", "train", str(trained_run["run_dir"] / "config.yaml"), *short_run(run)),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank, ns in enumerate(two_nodes)
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world size 2" in outs[0]
    assert_two_node_checkpoint(run, outs[0])


@contextlib.contextmanager
def ray_node(ns: str, addr: str, temp_dir: Path, head: str | None):
    """`ray start --block` in a namespace, in its own session; stopped by signalling that session only
    (never `ray stop`, which would stop every Ray on the machine)."""
    cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={addr}", "--num-cpus=1", "--num-gpus=0",
           "--disable-usage-stats"]
    cmd += [f"--address={head}"] if head else ["--head", "--port=6379", "--include-dashboard=false",
                                               f"--temp-dir={temp_dir}"]
    proc = subprocess.Popen(in_ns(ns, *cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_nodes(ns: str, address: str, n: int, timeout: float = 90) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(in_ns(ns, sys.executable, "-c", probe, address), capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not reach {n} nodes: {out.stdout[-500:]} {out.stderr[-1500:]}")


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "ray").exists(), reason="ray is not installed")
def test_ray_train_across_two_network_namespaces_trains_and_commits(trained_run, two_nodes, tmp_path):
    run, address = tmp_path / "run", f"{ADDRS[0]}:6379"
    temp = Path(f"/tmp/r77-{os.getpid()}")  # unix socket paths must stay short
    try:
        with ray_node(two_nodes[0], ADDRS[0], temp, None), ray_node(two_nodes[1], ADDRS[1], temp, address):
            wait_for_nodes(two_nodes[0], address, 2)
            proc = subprocess.run(
                in_ns(two_nodes[0], f"RAY_ADDRESS={address}", sys.executable, "-m", "pipeline.cli", "train",
                      str(trained_run["run_dir"] / "config.yaml"), "--backend", "ray", "--num-workers", "2",
                      *short_run(run)),
                cwd=ROOT, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert_two_node_checkpoint(run, out)
    # the two TorchTrainer workers ran on the two nodes: their logs carry each node's address
    assert f"ip={ADDRS[1]}" in out, out[-3000:]
