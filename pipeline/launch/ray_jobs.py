"""`pretrain submit --to ray`: one Ray job runs prepare → train → eval on a running Ray cluster.

How the code reaches the cluster (``launch.ray.code``):
- ``working_dir`` (default): pipeline/, configs/ and the resolved config are uploaded with the job
  (Ray's runtime_env working_dir, a few hundred KB; never .venv, runs/ or data/). The cluster's Python
  (the docker/Dockerfile.cuda image) supplies the dependencies; the job runs the code you submitted.
- ``shared``: the cluster sees this checkout at the same path (NFS, or docker/compose.yaml which
  mounts it); nothing is uploaded and the job runs ``cd <checkout> && python -m pipeline.cli ...``.
Either way run_dir and data.output_dir are made absolute and must be storage every node shares.

The train stage is `pipeline.launch.ray_train` (Ray Train's TorchTrainer), so ``launch.nodes > 1``
trains across nodes; prepare uses the cluster for Ray Data; eval runs in the driver.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, to_yaml
from pipeline.launch.cluster import PROJECT_ROOT, SubmitError, absolute_paths, stage_commands, stage_project
from pipeline.rundir import RunDir
from pipeline.storage import open_storage


def resolve_address(cli_address: str | None, cfg: PipelineConfig) -> str:
    address = cli_address or cfg.launch.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no Ray cluster address: pass --address http://HEAD:8265, set launch.ray.address "
                          "or RAY_ADDRESS (the Jobs API is served by the head node's dashboard, port 8265)")
    if "://" not in address:
        address = f"http://{address}"
    return address


def job_spec(cfg: PipelineConfig, stage: str, config_ref: str, working_dir: str | None) -> dict:
    """Entrypoint, runtime_env and metadata of the job (JSON-able; printed by --dry-run)."""
    r = cfg.launch.ray
    commands = stage_commands(r.python, config_ref, cfg.run_dir, stage, train_module="pipeline.launch.ray_train")
    if working_dir is None:  # shared: the checkout is at the same path on the cluster
        commands = [f"cd {shlex.quote(str(PROJECT_ROOT))}"] + commands
    runtime_env: dict = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    spec = {
        "entrypoint": " && ".join(commands),
        "runtime_env": runtime_env,
        "metadata": {"pretrain_run": cfg.name, "run_dir": cfg.run_dir, "stage": stage},
    }
    if cfg.launch.gpus_per_node:  # the driver (prepare, eval) on a GPU node too
        spec["entrypoint_num_gpus"] = 0.01
    return spec


def _follow(client, job_id: str, poll_s: float, out) -> str:
    from ray.job_submission import JobStatus

    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if JobStatus(status).is_terminal():
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(poll_s)


def submit(cfg: PipelineConfig, *, stage: str = "all", address: str | None = None, dry_run: bool = False,
           wait: bool = False, poll_s: float = 2.0, out=print) -> int:
    cfg = absolute_paths(cfg)
    address = resolve_address(address, cfg)
    submission_id = f"pretrain-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    shared = cfg.launch.ray.code == "shared"
    with tempfile.TemporaryDirectory(prefix="pretrain-job-") as tmp:
        if shared:
            submitted = RunDir(cfg.run_dir).submitted
            if not dry_run:
                open_storage(submitted).write_atomic(f"{submission_id}.yaml", to_yaml(cfg))
            config_ref = str(submitted / f"{submission_id}.yaml")
            spec = job_spec(cfg, stage, config_ref, working_dir=None)
        else:  # the config travels with the code: a path relative to the job's working directory
            config_ref = stage_project(Path(tmp), to_yaml(cfg)).relative_to(tmp).as_posix()
            spec = job_spec(cfg, stage, config_ref, working_dir=tmp)
        if dry_run:
            shown = json.loads(json.dumps(spec))
            if not shared:
                shown["runtime_env"]["working_dir"] = f"<uploaded: pipeline/, configs/, {config_ref}>"
            out(f"# would submit to {address} as {submission_id}")
            out(json.dumps(shown, indent=2))
            return 0
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(submission_id=submission_id, **spec)
        except AuthenticationError:
            raise SubmitError(
                f"the Ray cluster at {address} requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                f"(or RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SubmitError(f"Ray cluster at {address} refused the job: {exc}") from None
    out(f"submitted Ray job {job_id} to {address}")
    out(f"  follow its logs: RAY_ADDRESS={address} ray job logs -f {job_id}")
    out(f"  status / stop:   ray job status {job_id} / ray job stop {job_id}")
    out(f"  outputs:         {cfg.run_dir}")
    if not wait:
        return 0
    status = _follow(client, job_id, poll_s, out)
    out(f"Ray job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def crontab_line(schedule: str, config: str, overrides: list[str], address: str, python: str = "python") -> str:
    """A crontab(5) entry that submits the job at each firing (Ray itself has no scheduler)."""
    args = [python, "-m", "pipeline.cli", "submit", str(Path(config).resolve()), "--to", "ray",
            "--address", address] + [a for o in overrides for a in ("--set", o)]
    return f"{schedule} cd {shlex.quote(str(PROJECT_ROOT))} && {shlex.join(args)}"
