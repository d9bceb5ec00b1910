"""`pretrain submit --to ray --wait` against a real Ray head on 127.0.0.1 (Jobs API via its dashboard):
prepare on the cluster, Ray Train with two workers, eval, all as one job."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import pretrain, tiny_overrides

pytestmark = pytest.mark.e2e

MARK = "PRETRAIN_TEST_RAY_HEAD"  # in the environment of every process of our head, and only ours
# Ray 2.60 turns on token authentication when a token exists (~/.ray/auth_token, written by any earlier
# local ray.init()); our head uses its own token, so the test does not depend on that file.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(proc: Path, token: str, temp_dir: str) -> bool:
    """A process of our head: our marker in its environment, or our temp dir in its command line or
    open files (Ray's agents rename themselves and overwrite their environment block)."""
    try:
        if f"{MARK}={token}".encode() in (proc / "environ").read_bytes().split(b"\0"):
            return True
        if temp_dir.encode() in (proc / "cmdline").read_bytes():
            return True
        return any(os.readlink(fd).startswith(temp_dir) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def _our_pids(token: str, temp_dir: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and _ours(p, token, temp_dir)]


def _stop_head(token: str, temp_dir: str) -> None:
    """`ray stop` would stop every Ray on the machine; end only the processes of our head."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _our_pids(token, temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = _our_pids(token, temp_dir)
        if not pids:
            return


@pytest.fixture(scope="module")
def ray_head():
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no `ray` next to {sys.executable}")
    token = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    env = {**os.environ, MARK: token, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", **AUTH}
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
           "--num-cpus", "2", "--temp-dir", temp_dir, "--ray-client-server-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            if "dashboard" in started.stderr.lower() and "ray[default]" in started.stderr:
                pytest.skip("the Ray dashboard needs ray[default]: pip install 'ray[default]'")
            raise AssertionError(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_head(token, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# slow: the default run submits prepare → train → eval as one Ray job with --wait on a two-node Ray
# cluster (tests/e2e/test_ray_two_nodes.py)
@pytest.mark.slow
def test_submit_wait_runs_prepare_train_eval_as_one_ray_job(ray_head, corpus, tmp_path):
    sets = tiny_overrides(tmp_path, f"[{{path: '{corpus[0]}'}}]") + [
        "--set", "train.nproc_per_node=2",  # two Ray Train workers of one CPU each
        "--set", f"launch.ray.python={sys.executable}",
    ]
    done = pretrain("submit", "configs/demo.yaml", "--to", "ray", "--wait", "--address", ray_head, *sets,
                    timeout=600, check=False, env=AUTH)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    job_id = out.split("submitted Ray job ")[1].split()[0]
    assert f"ray job logs -f {job_id}" in out
    assert f"Ray job {job_id}: SUCCEEDED" in out
    assert "ray train: 2 workers" in out and "world size 2" in out  # the job's log, followed by --wait

    data, run_dir = tmp_path / "data", tmp_path / "run"
    assert (data / "manifest.json").is_file()  # prepared by the job, on the cluster
    final = run_dir / "checkpoints" / "step_00000006"
    assert (final / "COMMIT").is_file()
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    result = json.loads((final / "eval.json").read_text())
    assert result["step"] == 6 and result["loss"] > 0
    assert not (run_dir / "run.lock").exists()  # the driver released its lock


def test_dry_run_prints_the_job_and_contacts_nothing(corpus, tmp_path):
    sets = tiny_overrides(tmp_path, f"[{{path: '{corpus[0]}'}}]")
    out = pretrain("submit", "configs/demo.yaml", "--to", "ray", "--dry-run", "--address", "http://127.0.0.1:9",
                   *sets).stdout
    spec = json.loads(out.split("\n", 1)[1])
    assert "pipeline.launch.ray_train submitted/config.yaml" in spec["entrypoint"]
    assert spec["metadata"]["run_dir"] == str(tmp_path / "run")


def test_a_token_protected_cluster_without_the_token_is_one_clear_line(ray_head, corpus, tmp_path):
    sets = tiny_overrides(tmp_path, f"[{{path: '{corpus[0]}'}}]")
    done = pretrain("submit", "configs/demo.yaml", "--to", "ray", "--address", ray_head, *sets, check=False,
                    env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, timeout=120)
    assert done.returncode == 1 and "requires a token" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_cluster_is_one_clear_line(corpus, tmp_path):
    sets = tiny_overrides(tmp_path, f"[{{path: '{corpus[0]}'}}]")
    done = pretrain("submit", "configs/demo.yaml", "--to", "ray", "--address", f"http://127.0.0.1:{_free_port()}",
                    *sets, check=False, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("pretrain submit: error: ") and "Traceback" not in done.stderr
