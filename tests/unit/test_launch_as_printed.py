"""What `pretrain submit` prints runs as printed: the interpreter and directory are the submitter's,
every file a dry-run names exists, follow-up commands carry their environment without printing a
token, and a Kubernetes job without storage every pod shares is refused in one line."""

from __future__ import annotations

import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.config import ConfigError, build_config, load_config
from pipeline.launch import cluster, k8s, ray_jobs, slurm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *sets):
    return load_config(ROOT / "configs/demo.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.output_dir={tmp_path / 'data'}", *sets])


def test_jobs_run_the_submitting_python_unless_launch_python_says_otherwise(tmp_path):
    assert cluster.interpreter(_cfg(tmp_path)) == sys.executable
    assert cluster.interpreter(_cfg(tmp_path, "launch.python=/opt/py/bin/python3")) == "/opt/py/bin/python3"
    cfg = _cfg(tmp_path, "launch.python=/opt/py/bin/python3", "launch.slurm.python=/site/python")
    assert cluster.interpreter(cfg, cfg.launch.slurm.python) == "/site/python"
    script = slurm.render_sbatch(_cfg(tmp_path), str(tmp_path / "c.yaml"))
    stages = [l for l in script.splitlines() if l.startswith("stage ")]
    assert len(stages) == 3 and all(f" {sys.executable} -m " in s for s in stages), stages
    assert f"cd {shlex.quote(str(Path.cwd().resolve()))}" in script.splitlines()


def test_slurm_dry_run_writes_every_file_the_script_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = []
    assert slurm.submit(_cfg(tmp_path), dry_run=True, out=printed.append) == 0
    script = printed[0]
    saved = list((tmp_path / "run/submitted").glob("slurm-*.sbatch"))
    assert len(saved) == 1 and saved[0].read_text() == script
    log_dir = re.search(r"^#SBATCH --output=(\S+)/%x-%j.out$", script, re.M).group(1)
    assert Path(log_dir).is_dir()
    configs = set(re.findall(r"(\S+/submitted/slurm-\S+\.yaml)", script))
    assert configs and all(Path(c).is_file() for c in configs)
    assert build_config(yaml.safe_load(Path(configs.pop()).read_text())).run_dir == str(tmp_path / "run")


def test_ray_follow_up_commands_source_a_private_env_file_and_never_show_the_token(tmp_path, monkeypatch):
    token = "f" * 64
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    cfg = cluster.absolute_paths(_cfg(tmp_path))
    env = ray_jobs.ray_env(cfg, "http://head:8265")
    assert env == tmp_path / "run/submitted/ray.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    lines = ray_jobs.follow_up(env, "raysubmit_1")
    assert all(token not in line for line in lines)
    # what the pasted command sees: the address and the auth variables, in a shell of its own
    shown = subprocess.run(["sh", "-c", f". {shlex.quote(str(env))} && env"], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert {"RAY_ADDRESS=http://head:8265", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN={token}"} <= set(shown)
    assert lines[0].startswith(f"  follow its logs: (. {env} && ")
    assert lines[0].endswith(" job logs -f raysubmit_1)")


def test_ray_crontab_line_uses_the_real_python_the_env_file_and_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    cfg = _cfg(tmp_path)
    line = ray_jobs.schedule(cfg, "*/5 * * * *", "configs/demo.yaml", ["train.max_steps=8"], "http://h:8265",
                             stage="train")
    assert "a" * 64 not in line
    assert line.startswith(f"*/5 * * * * . {tmp_path}/run/submitted/ray.env && cd ")
    assert f" && {sys.executable} -m pipeline.cli submit {ROOT / 'configs/demo.yaml'} --to ray " in line
    assert line.endswith(f"--set train.max_steps=8 --stage train --wait >> {tmp_path}/run/schedule.log 2>&1")
    assert (tmp_path / "run/submitted/ray.env").is_file()


@pytest.mark.parametrize("sets, field", [
    ([], "run_dir"),  # relative
    (["run_dir=/home/me/runs/a"], "run_dir"),  # absolute, local
    (["run_dir=s3://bucket/runs/a"], "data.output_dir"),  # the run on S3, the data on the pod's disk
])
def test_k8s_without_shared_storage_is_refused_naming_the_field(sets, field):
    cfg = load_config(ROOT / "configs/demo.yaml", sets)
    with pytest.raises(ConfigError) as refused:
        k8s.render(cfg)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{field}: ") and "launch.k8s.storage_claim" in line


def test_k8s_absolute_path_outside_the_mount_is_refused():
    cfg = load_config(ROOT / "configs/demo.yaml", ["launch.k8s.storage_claim=lm", "run_dir=/srv/runs/a"])
    with pytest.raises(ConfigError, match=r"^run_dir: /srv/runs/a is not under launch.k8s.mount_path \(/mnt/shared\)"):
        k8s.render(cfg)


def test_k8s_on_an_object_store_mounts_nothing_and_ships_no_nulls():
    cfg = load_config(ROOT / "configs/demo.yaml", ["run_dir=s3://b/runs/a", "data.output_dir=s3://b/data/a"])
    config_map, job = k8s.render(cfg)
    text = k8s.to_text([config_map, job])
    assert "null" not in text and "storage_claim" not in text and "mountPath: /mnt/shared" not in text
    assert "/mnt/shared/" not in text  # no path rewritten under a mount that nothing mounts
    kubernetes_validate.validate(config_map, "1.32", strict=True)
    shipped = build_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert shipped == k8s.pod_paths(cfg)  # the pruned config reads back as the same config


def test_k8s_with_a_claim_mounts_it_where_the_paths_point():
    cfg = load_config(ROOT / "configs/demo.yaml", ["launch.k8s.storage_claim=lm", "launch.k8s.mount_path=/data"])
    config_map, job = k8s.render(cfg)
    shipped = yaml.safe_load(config_map["data"]["config.yaml"])
    assert shipped["run_dir"] == "/data/runs/default" and shipped["data"]["output_dir"].startswith("/data/")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "shared", "mountPath": "/data"} in worker["containers"][0]["volumeMounts"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "lm"}} in worker["volumes"]
