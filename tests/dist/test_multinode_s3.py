"""Two nodes that share no filesystem, training a run that lives on object storage.

Each "node" is a network namespace (its own address on a veth pair, 10.78.0.1 ↔ 10.78.0.2) plus a
mount namespace with a private tmpfs for everything it writes: HOME, TMPDIR, the node cache
(PRETRAIN_CACHE_DIR: staged shards, the run's mirror). They share only the read-only code and
virtualenv. The run directory and the dataset are on an S3 API server (moto's server: an emulator
of the S3 API, not AWS) listening inside node 1's namespace, which both nodes reach over the veth.

One `torchrun --nnodes 2` per node trains with ``run_dir: s3://…``; both are SIGKILLed between two
commits, restarted, and must continue bitwise from the last COMMIT on the store: the losses of every
step equal those of an uninterrupted two-node run. The folders the tmpfs were mounted on are empty
afterwards: nothing was written where both nodes could see it. Needs root (ip netns, mount).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.netns import veth_pair

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IFACE = "p78"
ADDRS = ("10.78.0.1", "10.78.0.2")
S3_PORT = 9778
BUCKET = "nodes-share-nothing"
SLOW = Path(__file__).resolve().parent / "slow_steps"

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
                       reason="network and mount namespaces need root, iproute2 and util-linux"),
]


@pytest.fixture
def two_nodes():
    with veth_pair("78", IFACE, ADDRS) as names:
        yield names


ENDPOINT = f"http://{ADDRS[0]}:{S3_PORT}"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_ENDPOINT_URL": ENDPOINT, "AWS_ENDPOINT_URL_S3": ENDPOINT}


def on_node(ns: str, private: Path, *cmd: str, extra_env: dict | None = None) -> list[str]:
    """``cmd`` on a node: its network namespace, and a new mount namespace whose tmpfs on
    ``private`` holds everything the node writes."""
    env = {**AWS, "HOME": f"{private}/home", "TMPDIR": f"{private}/tmp", "PRETRAIN_CACHE_DIR": f"{private}/cache",
           "GLOO_SOCKET_IFNAME": IFACE, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "WANDB_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", **(extra_env or {})}
    script = (f'mount -t tmpfs tmpfs "{private}" && mkdir -p "{private}/home" "{private}/tmp" && '
              f'exec env {" ".join(f"{k}={v}" for k, v in env.items())} "$@"')
    return ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            "node", *cmd]


def s3_call(ns: str, code: str) -> str:
    """Python with boto3 on node 1 (where the S3 server listens): the test's own view of the bucket."""
    prelude = ("import boto3, json, sys; c = boto3.client('s3'); B = " + repr(BUCKET) + "\n")
    out = subprocess.run(["ip", "netns", "exec", ns, "env", *(f"{k}={v}" for k, v in AWS.items()),
                          sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def start_s3(ns: str) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "moto.server", "-H", ADDRS[0],
                             "-p", str(S3_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        probe = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                f"import urllib.request; urllib.request.urlopen('{ENDPOINT}/', timeout=1)"],
                               capture_output=True)
        if probe.returncode == 0:
            return proc
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the S3 emulator did not come up")


def upload_dataset(ns: str, data_dir: Path) -> None:
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != "manifest.json"
                   and not p.name.endswith((".lock", ".guard")))
    pairs = [(str(p), f"data/{p.relative_to(data_dir).as_posix()}") for p in files]
    pairs.append((str(data_dir / "manifest.json"), "data/manifest.json"))  # last: the commit point
    s3_call(ns, f"c.create_bucket(Bucket=B)\nfor f, k in {pairs!r}: c.upload_file(f, B, k)")


def committed(ns: str, prefix: str) -> list[int]:
    keys = json.loads(s3_call(ns, f"r = c.list_objects_v2(Bucket=B, Prefix={prefix + '/checkpoints/'!r})\n"
                                  "print(json.dumps([o['Key'] for o in r.get('Contents', [])]))"))
    return sorted(int(k.split("/")[-2].removeprefix("step_")) for k in keys if k.endswith("/COMMIT"))


def losses(ns: str, prefix: str) -> dict[int, float]:
    text = s3_call(ns, f"print(c.get_object(Bucket=B, Key={prefix + '/metrics.jsonl'!r})['Body'].read().decode())")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}  # a re-run step: its last line


def launch(nodes, privates, config: Path, prefix: str, port: int, steps: int, sleep_s: float = 0.0):
    sets = [f"run_dir=s3://{BUCKET}/{prefix}", f"data.output_dir=s3://{BUCKET}/data", f"train.max_steps={steps}",
            "checkpoint.save_interval_steps=2", "train.log_interval_steps=1", "tracking.mode=disabled",
            "train.seq_len=32", "train.micro_batch_size_per_gpu=2", "train.global_batch_size=4",
            "eval.max_samples=8", "eval.micro_batch_size=2", "launch.lock_lease_s=20", "launch.lock_heartbeat_s=5"]
    extra = {"PRETRAIN_TEST_STEP_SLEEP_S": str(sleep_s), "PYTHONPATH": f"{SLOW}:{ROOT}"} if sleep_s else \
        {"PYTHONPATH": str(ROOT)}
    return [subprocess.Popen(
        on_node(ns, private, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                "--nproc-per-node", "1", "--master-addr", ADDRS[0], "--master-port", str(port),
                "-m", "pipeline.cli", "train", str(config), *[a for s in sets for a in ("--set", s)], extra_env=extra),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank, (ns, private) in enumerate(zip(nodes, privates))]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun puts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a node at once, as losing the machine would."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(procs, timeout: float = 300) -> list[str]:
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + "\n----\n" + outs[1][-3000:]
    return outs


def test_two_nodes_sharing_nothing_train_on_s3_survive_sigkill_and_continue_bitwise(trained_run, two_nodes,
                                                                                 tmp_path):
    privates = [tmp_path / "node1-private", tmp_path / "node2-private"]
    for p in privates:
        p.mkdir()
    config = trained_run["run_dir"] / "config.yaml"
    server = start_s3(two_nodes[0])
    try:
        upload_dataset(two_nodes[0], trained_run["data_dir"])
        # the uninterrupted reference
        finish(launch(two_nodes, privates, config, "reference", 29781, steps=6))
        reference = losses(two_nodes[0], "reference")
        assert sorted(reference) == [1, 2, 3, 4, 5, 6]

        procs = launch(two_nodes, privates, config, "killed", 29782, steps=6, sleep_s=0.7)
        deadline = time.monotonic() + 240
        while not committed(two_nodes[0], "killed") and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a node exited before the first commit"
            time.sleep(0.5)
        trees = [descendants(p.pid) for p in procs]
        for p in procs:  # both nodes at once, as a lost allocation would
            kill_node(p)
        at_kill = committed(two_nodes[0], "killed")
        for p in procs:
            p.wait(timeout=30)
        assert at_kill and at_kill[-1] < 6, at_kill
        assert len(trees[0]) >= 2 and len(trees[1]) >= 2  # launcher and rank on each node
        time.sleep(1)
        last = committed(two_nodes[0], "killed")[-1]
        assert last == at_kill[-1]  # nothing of the killed run lives on

        outs = finish(launch(two_nodes, privates, config, "killed", 29783, steps=6))
        assert f"step {last}" in outs[0] and "resum" in outs[0].lower(), outs[0][-3000:]
        resumed = losses(two_nodes[0], "killed")
        assert committed(two_nodes[0], "killed")[-1] == 6
        assert resumed == reference  # bitwise: the same float for every step, before and after the kill
        state = json.loads(s3_call(two_nodes[0], "print(c.get_object(Bucket=B, Key='killed/checkpoints/"
                                                 "step_00000006/trainer_state.json')['Body'].read().decode())"))
        assert state["world_size"] == 2 and len(set(state["sample_digests"])) == 2
    finally:
        server.terminate()
        server.wait(timeout=10)
    for p in privates:  # each node wrote only into its own tmpfs: nothing reached the shared tree
        assert list(p.iterdir()) == [], list(p.rglob("*"))[:10]
