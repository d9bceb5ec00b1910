"""`pretrain train` with its run directory and dataset on object storage, through the real CLI,
against a real S3 API server on loopback (moto's server: an emulator of the S3 API, not AWS).

Each "machine" is a fresh node cache (PRETRAIN_CACHE_DIR): nothing carries over between them but
the bucket.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import pretrain

pytestmark = pytest.mark.e2e


def upload_dataset(s3, data_dir: Path, prefix: str) -> str:
    """A prepared local dataset onto the bucket the way prepare publishes one: manifest last."""
    c = s3.client()
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != "manifest.json"
                   and not p.name.endswith((".lock", ".guard")))
    for p in [*files, data_dir / "manifest.json"]:
        c.upload_file(str(p), s3.bucket, f"{prefix}/{p.relative_to(data_dir).as_posix()}")
    return f"s3://{s3.bucket}/{prefix}"


def objects(s3, prefix: str) -> dict[str, bytes]:
    c = s3.client()
    return {k: c.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in s3.keys(s3.bucket, prefix)}


def run_sets(trained_run, run: str, data: str, steps: int) -> list[str]:
    sets = list(trained_run["sets"])
    pairs = {"run_dir": run, "data.output_dir": data, "train.max_steps": str(steps)}
    out = []
    for i in range(0, len(sets), 2):
        key = sets[i + 1].split("=", 1)[0]
        out += ["--set", f"{key}={pairs.pop(key)}"] if key in pairs else sets[i:i + 2]
    return out + [a for k, v in pairs.items() for a in ("--set", f"{k}={v}")]


def test_a_run_on_s3_commits_there_and_resumes_from_another_machine(trained_run, s3, tmp_path):
    data = upload_dataset(s3, trained_run["data_dir"], "datasets/tiny")
    run = f"s3://{s3.bucket}/runs/tiny"
    first = pretrain("train", "configs/demo.yaml", *run_sets(trained_run, run, data, 3),
                     env={"PRETRAIN_CACHE_DIR": str(tmp_path / "machine-a")})
    out = first.stdout + first.stderr
    assert "staged" in out and "dataset files" in out, out[-3000:]

    stored = objects(s3, "runs/tiny/")
    commit = json.loads(stored["runs/tiny/checkpoints/step_00000003/COMMIT"])
    assert commit["step"] == 3 and set(commit["files"]) == set(commit["sizes"])
    for name, sha in commit["files"].items():  # COMMIT lists every object with its size and sha256
        body = stored[f"runs/tiny/checkpoints/step_00000003/{name}"]
        assert hashlib.sha256(body).hexdigest() == sha and len(body) == commit["sizes"][name]
    listed = {f"runs/tiny/checkpoints/step_00000003/{n}" for n in commit["files"]}
    ckpt_objects = {k for k in stored if k.startswith("runs/tiny/checkpoints/step_")}
    assert ckpt_objects == listed | {"runs/tiny/checkpoints/step_00000003/COMMIT"}
    assert stored["runs/tiny/checkpoints/latest"] == b"step_00000003\n"
    for key in ("config.yaml", "metrics.jsonl", "last_run.json"):
        assert f"runs/tiny/{key}" in stored, sorted(stored)
    assert "runs/tiny/run.lock" not in stored  # released on the store
    assert not any("secret" in v.decode("utf-8", "replace").lower() or "testing" in v.decode("utf-8", "replace")
                   for k, v in stored.items() if k.endswith((".yaml", ".json", ".jsonl")))

    # a second machine, nothing in its cache: resumes from the store's newest COMMIT
    second = pretrain("train", "configs/demo.yaml", *run_sets(trained_run, run, data, 6),
                      env={"PRETRAIN_CACHE_DIR": str(tmp_path / "machine-b")})
    out = second.stdout + second.stderr
    assert "resum" in out and "step 3" in out, out[-3000:]
    stored = objects(s3, "runs/tiny/")
    assert "runs/tiny/checkpoints/step_00000006/COMMIT" in stored
    steps = [json.loads(line)["step"] for line in stored["runs/tiny/metrics.jsonl"].decode().splitlines()
             if '"train/loss"' in line]
    assert steps and max(steps) == 6 and min(steps) <= 2  # the log went on from the first machine's

    # eval --watch, status and report from a third machine
    third = {"PRETRAIN_CACHE_DIR": str(tmp_path / "machine-c")}
    pretrain("eval", run, "--watch", "--max-evals", "2", "--interval-s", "1", env=third)
    keys = set(s3.keys(s3.bucket, "runs/tiny/"))
    assert {"runs/tiny/checkpoints/step_00000006/eval.json", "runs/tiny/eval/step_00000006.json",
            "runs/tiny/eval_metrics.jsonl"} <= keys, sorted(keys)
    status = pretrain("status", run, "--json", env=third)
    assert json.loads(status.stdout)["step"] == 6
    pretrain("report", run, env={"PRETRAIN_CACHE_DIR": str(tmp_path / "machine-c")})
    assert "runs/tiny/report.html" in s3.keys(s3.bucket, "runs/tiny/")


def test_a_wrong_bucket_is_one_line_before_any_rank_starts(trained_run, s3, tmp_path):
    proc = pretrain("train", "configs/demo.yaml", *run_sets(trained_run, "s3://no-such-bucket-zz/run",
                                                            str(trained_run["data_dir"]), 3), check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert err[-1].startswith("pretrain train: error: s3://no-such-bucket-zz/run: bucket 'no-such-bucket-zz' does not exist"), err
    assert "Traceback" not in proc.stderr and "step" not in proc.stdout


def test_an_altered_shard_on_the_store_is_refused_naming_it(trained_run, s3, tmp_path):
    data = upload_dataset(s3, trained_run["data_dir"], "datasets/tampered")
    shard = next(k for k in s3.keys(s3.bucket, "datasets/tampered/train/") if k.endswith(".bin"))
    c = s3.client()
    body = bytearray(c.get_object(Bucket=s3.bucket, Key=shard)["Body"].read())
    body[0] ^= 0xFF
    c.put_object(Bucket=s3.bucket, Key=shard, Body=bytes(body))
    proc = pretrain("train", "configs/demo.yaml", *run_sets(trained_run, str(tmp_path / "run"), data, 3), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"s3://{s3.bucket}/{shard}: sha256" in line and "does not match" in line, line


def test_a_flaky_store_is_retried_and_the_checkpoints_still_commit_correctly(trained_run, s3, tmp_path, monkeypatch):
    """A proxy in front of the emulator answers 8% of requests with 503 SlowDown or drops the
    connection; the run commits, every committed object matches its COMMIT, and the retries are told."""
    from helpers.s3 import FaultProxy

    data = upload_dataset(s3, trained_run["data_dir"], "datasets/flaky")
    with FaultProxy(s3.endpoint, fail_share=0.08, seed=7, grace=3) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        proc = pretrain("train", "configs/demo.yaml",
                        *run_sets(trained_run, f"s3://{s3.bucket}/runs/flaky", data, 3), env=env)
    out = proc.stdout + proc.stderr
    assert proxy.failed_503 + proxy.dropped > 0
    assert "object-store requests retried" in out, out[-2000:]
    stored = objects(s3, "runs/flaky/checkpoints/step_00000003/")
    commit = json.loads(stored.pop("runs/flaky/checkpoints/step_00000003/COMMIT"))
    assert {k.rsplit("/", 1)[-1] for k in stored} == set(commit["files"])
    for key, body in stored.items():
        assert hashlib.sha256(body).hexdigest() == commit["files"][key.rsplit("/", 1)[-1]]


def test_the_run_lock_on_the_store_keeps_a_second_trainer_out(trained_run, s3, tmp_path):
    """The lease is an object created with If-None-Match: a live one stops a second trainer with exit 3."""
    import socket
    import time

    run = f"s3://{s3.bucket}/runs/locked"
    lease = {"host": "elsewhere-" + socket.gethostname(), "pid": 1, "pid_start": "", "started_at": time.time(),
             "expires_at": time.time() + 600, "token": "other", "command": "pretrain train"}
    s3.client().put_object(Bucket=s3.bucket, Key="runs/locked/run.lock", Body=json.dumps(lease).encode())
    proc = pretrain("train", "configs/demo.yaml", *run_sets(trained_run, run, str(trained_run["data_dir"]), 3),
                    check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{run} is being trained by pid 1 on elsewhere-" in proc.stderr.strip().splitlines()[-1]


def test_a_store_without_conditional_writes_is_refused_unless_the_lock_is_off(trained_run, s3, tmp_path):
    from helpers.s3 import FaultProxy

    with FaultProxy(s3.endpoint, strip_conditional=True) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        sets = run_sets(trained_run, f"s3://{s3.bucket}/runs/nolock", str(trained_run["data_dir"]), 3)
        proc = pretrain("train", "configs/demo.yaml", *sets, env=env, check=False)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "ignores conditional writes (If-None-Match)" in line, proc.stderr[-2000:]
        assert "launch.lock=false" in line
        pretrain("train", "configs/demo.yaml", *sets, "--set", "launch.lock=false", env=env)
    assert "runs/nolock/checkpoints/step_00000003/COMMIT" in s3.keys(s3.bucket, "runs/nolock/")


@pytest.mark.slow  # the default run covers each of its steps on s3:// in the tests above
def test_the_demo_runs_its_whole_flow_on_s3(s3, tmp_path):
    """`pretrain demo --run-dir s3://…`: corpus, prepared dataset (manifest last), checkpoints with
    COMMIT, metrics, eval record, report and W&B offline folders all reach the bucket."""
    run = f"s3://{s3.bucket}/demo"
    out = pretrain("demo", "--run-dir", run, "--set", "train.max_steps=20", "--set", "checkpoint.save_interval_steps=10",
                   "--set", "train.log_interval_steps=10", "--set", "eval.max_samples=32", timeout=900)
    assert "demo finished" in out.stdout, out.stdout[-3000:]
    assert f"metrics:      {run}/metrics.jsonl" in out.stdout
    keys = set(s3.keys(s3.bucket, "demo/"))
    for key in ("demo/data/manifest.json", "demo/checkpoints/step_00000020/COMMIT", "demo/checkpoints/latest",
                "demo/checkpoints/step_00000020/eval.json", "demo/eval/step_00000020.json", "demo/metrics.jsonl",
                "demo/report.html", "demo/config.yaml", "demo/last_run.json"):
        assert key in keys, sorted(keys)
    assert any(k.startswith("demo/data/train/") and k.endswith(".bin") for k in keys)
    assert any(k.startswith("demo/wandb/") and k.endswith(".wandb") for k in keys)


@pytest.mark.slow  # the default run covers elastic resume (tests/dist/test_elastic.py) and S3 resume above
def test_a_two_rank_run_on_s3_resumes_elastically_on_one_rank_from_another_machine(trained_run, s3, tmp_path):
    """World size 2 → 1 through the universal checkpoint, with the run on the store and a cold cache."""
    data = upload_dataset(s3, trained_run["data_dir"], "datasets/elastic")
    run = f"s3://{s3.bucket}/runs/elastic"
    pretrain("train", "configs/demo.yaml", *run_sets(trained_run, run, data, 3), "--set", "train.nproc_per_node=2",
             env={"PRETRAIN_CACHE_DIR": str(tmp_path / "machine-a")})
    out = pretrain("train", "configs/demo.yaml", *run_sets(trained_run, run, data, 6), "--set", "train.nproc_per_node=1",
                   env={"PRETRAIN_CACHE_DIR": str(tmp_path / "machine-b")})
    text = out.stdout + out.stderr
    assert "universal" in text, text[-3000:]
    state = json.loads(objects(s3, "runs/elastic/checkpoints/step_00000006/")
                       ["runs/elastic/checkpoints/step_00000006/trainer_state.json"])
    assert state["world_size"] == 1 and state["step"] == 6
    assert not any("/.universal/" in k for k in s3.keys(s3.bucket, "runs/elastic/"))  # scratch removed
