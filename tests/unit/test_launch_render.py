"""What `pretrain submit` hands to each cluster: sbatch scripts, KubeRay/CronJob manifests, Ray jobs,
and the Docker files they run in. Manifests are checked against schemas, not just by eye."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.launch import cluster, k8s, ray_jobs, slurm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32"
RAY_SCHEMA = json.loads((ROOT / "tests/data/kuberay/ray.io-v1.schema.json").read_text())


def cfg_for(tmp_path, *sets):
    return cluster.absolute_paths(load_config(ROOT / "configs/demo.yaml", [
        "run_dir=runs/r1", "data.output_dir=data/d1", "data.sources=[{path: corpus/a.jsonl}]", *sets,
    ]), base=tmp_path)


# ------------------------------------------------------------------------------------------ Slurm


def test_one_node_sbatch_script_runs_one_torchrun_through_srun(tmp_path):
    cfg = cfg_for(tmp_path, "train.nproc_per_node=2")
    script = slurm.render_sbatch(cfg, "/shared/cfg.yaml")
    assert script.startswith("#!/bin/bash\n")
    for line in ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", f"#SBATCH --output={tmp_path}/runs/r1/slurm/%x-%j.out",
                 "#SBATCH --job-name=pretrain-demo"]:
        assert line in script.splitlines()
    assert "--gpus-per-node" not in script  # CPU ranks: no GPU request
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "trap requeue USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    stages = [l for l in script.splitlines() if l.startswith("stage ")]
    assert [s.split(" -m ")[1].split()[0] for s in stages] == ["pipeline.cli", "torch.distributed.run", "pipeline.cli"]
    assert "prepare /shared/cfg.yaml" in stages[0] and f"eval {tmp_path}/runs/r1" in stages[2]
    assert stages[1].startswith("stage srun --kill-on-bad-exit=1 --ntasks-per-node=1 ")
    assert "--nproc-per-node=2 " in stages[1] and "--rdzv-backend=c10d" in stages[1]
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in stages[1]
    assert "{{" not in script


def test_four_node_gpu_script_asks_for_gpus_and_one_rank_per_gpu(tmp_path):
    cfg = cfg_for(tmp_path, "launch.nodes=4", "launch.gpus_per_node=8", "launch.slurm.partition=gpu",
                  "launch.slurm.account=lm", "launch.slurm.time_limit=2-00:00:00", "launch.rdzv_port=29611")
    script = slurm.render_sbatch(cfg, "/shared/cfg.yaml", stage="train")
    lines = script.splitlines()
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lm", "#SBATCH --time=2-00:00:00"]:
        assert line in lines
    assert 'export MASTER_ADDR="$head_node" MASTER_PORT=29611' in lines
    stages = [l for l in lines if l.startswith("stage ")]
    assert len(stages) == 1 and "--nproc-per-node=8 " in stages[0]
    assert '--nnodes="$SLURM_JOB_NUM_NODES"' in stages[0] and '--rdzv-id="$SLURM_JOB_ID"' in stages[0]


def test_template_with_an_unknown_field_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['partitoin'\]"):
        slurm.render_template("#SBATCH -p {{partitoin}}", {"partition": "gpu"})


def test_scrontab_block_is_replaced_not_duplicated(tmp_path):
    cfg = cfg_for(tmp_path)
    block = slurm.scrontab_entry(cfg, "0 */6 * * *", Path("/s/job.sbatch"))
    assert "0 */6 * * * sbatch --dependency=singleton --job-name=pretrain-demo /s/job.sbatch" in block
    mine = "MAILTO=me\n30 1 * * * other-job\n"
    once = slurm.merge_scrontab(mine, block, "pretrain-demo")
    twice = slurm.merge_scrontab(once, block.replace("*/6", "*/2"), "pretrain-demo")
    assert twice.count("begin") == 1 and "*/2" in twice and "*/6" not in twice
    assert twice.startswith(mine)


# ------------------------------------------------------------------------------------- Kubernetes


def _check_pod_template(template: dict) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": template["spec"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_rayjob_manifest_matches_the_kuberay_schema_and_pod_schemas(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [
        "run_dir=runs/r1", "launch.nodes=2", "launch.gpus_per_node=4", "launch.k8s.storage_claim=lm-data"])
    config_map, job = k8s.render(cfg)
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    jsonschema.validate(job, RAY_SCHEMA)
    spec = job["spec"]
    cluster_spec = spec["rayClusterSpec"]
    _check_pod_template(cluster_spec["headGroupSpec"]["template"])
    workers = cluster_spec["workerGroupSpecs"][0]
    _check_pod_template(workers["template"])
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "python -m pipeline.launch.ray_train /etc/pretrain/config.yaml" in spec["entrypoint"]
    assert spec["entrypoint"].endswith("python -m pipeline.cli eval /mnt/shared/runs/r1")
    # the config the pods read: paths under the shared volume
    shipped = yaml.safe_load(config_map["data"]["config.yaml"])
    assert shipped["run_dir"] == "/mnt/shared/runs/r1" and shipped["launch"]["nodes"] == 2


def test_raycronjob_wraps_the_same_job_with_a_schedule(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", ["run_dir=runs/r1", "launch.k8s.storage_claim=lm-data"])
    _, cron = k8s.render(cfg, schedule="0 */6 * * *")
    jsonschema.validate(cron, RAY_SCHEMA)
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"] == "0 */6 * * *"
    assert cron["spec"]["jobTemplate"] == k8s.ray_job_spec(k8s.pod_paths(cfg))


def test_cronjob_submits_to_a_standing_ray_cluster_and_validates_as_batch_v1(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [
        "launch.k8s.schedule_kind=CronJob", "launch.ray.address=http://lm-head-svc:8265",
        "launch.k8s.storage_claim=lm-data"])
    config_map, cron = k8s.render(cfg, schedule="15 3 * * 1")
    kubernetes_validate.validate(cron, K8S_VERSION, strict=True)
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["pretrain", "submit"] and "--wait" in command and "http://lm-head-svc:8265" in command


def test_cronjob_without_a_ray_address_is_a_config_error():
    cfg = load_config(ROOT / "configs/demo.yaml", ["launch.k8s.schedule_kind=CronJob", "launch.k8s.storage_claim=lm"])
    with pytest.raises(ConfigError, match="launch.ray.address"):
        k8s.render(cfg, schedule="0 * * * *")


def test_the_schema_rejects_a_misspelt_field():
    cfg = load_config(ROOT / "configs/demo.yaml", ["launch.k8s.storage_claim=lm"])
    _, job = k8s.render(cfg)
    job["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAY_SCHEMA)


def test_k8s_names_are_dns_labels():
    cfg = load_config(ROOT / "configs/demo.yaml", ["run_name=My_Run.v2 (test)"])
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", k8s.k8s_name(cfg))


# --------------------------------------------------------------------------------------------- Ray


def test_ray_job_ships_the_code_and_runs_three_stages(tmp_path):
    cfg = cfg_for(tmp_path)
    spec = ray_jobs.job_spec(cfg, "all", "submitted/config.yaml", working_dir="/tmp/stage")
    assert spec["runtime_env"]["working_dir"] == "/tmp/stage"
    parts = spec["entrypoint"].split(" && ")
    py = sys.executable  # the interpreter running `pretrain submit`, as launch.python is unset
    assert parts == [f"{py} -m pipeline.cli prepare submitted/config.yaml --append",
                     f"{py} -m pipeline.launch.ray_train submitted/config.yaml",
                     f"{py} -m pipeline.cli eval {tmp_path}/runs/r1"]
    shared = ray_jobs.job_spec(cfg, "eval", "/x/c.yaml", working_dir=None)
    assert "working_dir" not in shared["runtime_env"]
    assert shared["entrypoint"] == f"cd {Path.cwd().resolve()} && {py} -m pipeline.cli eval {tmp_path}/runs/r1"


def test_staged_project_has_code_and_config_but_no_venv_or_runs(tmp_path):
    cluster.stage_project(tmp_path, "run_dir: /x\n")
    names = {p.name for p in tmp_path.iterdir()}
    assert {"pipeline", "configs", "submitted", "pyproject.toml"} <= names
    assert not names & {".venv", "runs", "data", ".git", "tests"}
    assert not list(tmp_path.rglob("__pycache__"))
    assert (tmp_path / "submitted/config.yaml").read_text() == "run_dir: /x\n"


def test_relative_paths_become_absolute_against_the_submitting_directory(tmp_path):
    cfg = cfg_for(tmp_path)
    assert cfg.run_dir == str(tmp_path / "runs/r1")
    assert cfg.data.output_dir == str(tmp_path / "data/d1")
    assert cfg.data.sources[0].path == str(tmp_path / "corpus/a.jsonl")


def test_crontab_line_for_ray_resubmits_from_the_checkout():
    line = ray_jobs.crontab_line("0 * * * *", "configs/demo.yaml", ["train.max_steps=9"], "http://h:8265",
                                 python="/v/bin/python", env=Path("/r/submitted/ray.env"), log=Path("/r/schedule.log"))
    assert line.startswith(f"0 * * * * . /r/submitted/ray.env && cd {Path.cwd().resolve()} && "
                           f"/v/bin/python -m pipeline.cli submit ")
    assert "--to ray --address http://h:8265 --set train.max_steps=9 --wait >> /r/schedule.log 2>&1" in line


@pytest.mark.parametrize("bad", ["* * * *", "every day", "0 0 * * * *", "0 0 * * ;rm"])
def test_bad_cron_expressions_are_refused(bad):
    with pytest.raises(ConfigError, match="five cron fields"):
        cluster.check_cron(bad)


def test_missing_ray_address_names_the_ways_to_give_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--address"):
        ray_jobs.resolve_address(None, load_config(None))
    assert ray_jobs.resolve_address("127.0.0.1:8265", load_config(None)) == "http://127.0.0.1:8265"


# ------------------------------------------------------------------------------------------ Docker


def _copied_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    return sources


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_existing_files_and_install_like_the_makefile(name):
    dockerfile = ROOT / "docker" / name
    for src in _copied_sources(dockerfile):
        assert (ROOT / src).exists(), f"{name} copies {src}, which does not exist"
    text = dockerfile.read_text()
    assert "pip install -c constraints.txt" in text and "torch" in text
    assert re.search(r"pip install -c constraints.txt -e \"?\.", text)
    assert "WORKDIR /opt/pretrain" in text and k8s.CODE_DIR == "/opt/pretrain"


def test_compose_file_defines_a_ray_head_and_worker_from_existing_files():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker"}
    for svc in services.values():
        build = svc["build"]
        context = (ROOT / "docker" / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file()
    assert "--head" in services["ray-head"]["command"] and "--dashboard-host=0.0.0.0" in services["ray-head"]["command"]
    assert "8265:8265" in services["ray-head"]["ports"][0]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
