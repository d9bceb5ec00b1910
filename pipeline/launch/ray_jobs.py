"""`pretrain submit --to ray`: one Ray job runs prepare → train → eval on a running Ray cluster.

How the code reaches the cluster (``launch.ray.code``):
- ``working_dir`` (default): pipeline/, configs/ and the resolved config are uploaded with the job
  (Ray's runtime_env working_dir, a few hundred KB; never .venv, runs/ or data/). The cluster's Python
  (the docker/Dockerfile.cuda image) supplies the dependencies; the job runs the code you submitted.
- ``shared``: the cluster sees this checkout at the same path (NFS, or docker/compose.yaml which
  mounts it); nothing is uploaded and the job runs ``cd <submit dir> && PYTHON -m pipeline.cli ...``.
Either way run_dir and data.output_dir are made absolute and must be storage every node shares.
PYTHON is `cluster.interpreter`: launch.ray.python, else launch.python, else the submitting Python.

The commands printed after a submission (`ray job logs`, status, stop) and the ``--schedule`` crontab
line source RUN_DIR/submitted/ray.env (mode 0600): RAY_ADDRESS and the token-auth variables this
submission used, so they run as pasted and no token is printed.

The train stage is `pipeline.launch.ray_train` (Ray Train's TorchTrainer), so ``launch.nodes > 1``
trains across nodes; prepare uses the cluster for Ray Data; eval runs in the driver.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, to_yaml
from pipeline.launch.cluster import (SubmitError, absolute_paths, env_file, interpreter, logged, stage_commands,
                                     stage_project, workdir)
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
    commands = stage_commands(interpreter(cfg, cfg.launch.ray.python), config_ref, cfg.run_dir, stage, train_module="pipeline.launch.ray_train")
    if working_dir is None:  # shared: the checkout is at the same path on the cluster
        commands = [f"cd {shlex.quote(str(workdir()))}"] + commands
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


AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def ray_env(cfg: PipelineConfig, address: str) -> Path:
    """RUN_DIR/submitted/ray.env: the address and the auth variables of this environment."""
    values = {"RAY_ADDRESS": address} | {k: os.environ[k] for k in AUTH_VARS if os.environ.get(k)}
    return env_file(RunDir(cfg.run_dir).ray_env, values)


def ray_cli() -> str:
    """The `ray` command next to this Python (its virtualenv need not be activated), else on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


def follow_up(env: Path, job_id: str) -> list[str]:
    """The commands to watch and stop the job, each runnable as pasted into any shell."""
    ray = f"(. {shlex.quote(str(env))} && {shlex.quote(ray_cli())} job"
    return [f"  follow its logs: {ray} logs -f {job_id})",
            f"  status:          {ray} status {job_id})",
            f"  stop:            {ray} stop {job_id})"]


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
            submitted = RunDir(cfg.run_dir).submitted  # written on --dry-run too: the spec names it
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
    for line in follow_up(ray_env(cfg, address), job_id):
        out(line)
    out(f"  outputs:         {cfg.run_dir}")
    if not wait:
        return 0
    status = _follow(client, job_id, poll_s, out)
    code = client.get_job_info(job_id).driver_exit_code  # the entrypoint's: 3 when the run was locked
    out(f"Ray job {job_id}: {status}" + ("" if code is None else f" (exit code {code})"))
    return 0 if status == "SUCCEEDED" else 1


def crontab_line(schedule: str, config: str, overrides: list[str], address: str, *, python: str, env: Path,
                 log: Path, stage: str = "all") -> str:
    """A crontab(5) entry that submits the job at each firing and waits for it (Ray itself has no
    scheduler): cron's bare environment gets the address and token from ``env``, the firing's output
    (the job's log, its end and exit code) is appended to ``log``."""
    args = [python, "-m", "pipeline.cli", "submit", str(Path(config).resolve()), "--to", "ray",
            "--address", address] + [a for o in overrides for a in ("--set", o)]
    args += (["--stage", stage] if stage != "all" else []) + ["--wait"]
    command = logged(f". {shlex.quote(str(env))} && cd {shlex.quote(str(workdir()))} && {shlex.join(args)}", log)
    if "%" in command:
        raise ConfigError(f"the crontab line would hold a '%', which cron reads as a newline: {command}; "
                          f"rename the path or override that holds it")
    return f"{schedule} {command}"


def schedule(cfg: PipelineConfig, schedule: str, config: str, overrides: list[str], address: str | None,
             stage: str = "all") -> str:
    """The crontab line for ``--schedule`` (written: the env file it sources)."""
    cfg = absolute_paths(cfg)
    address = resolve_address(address, cfg)
    return crontab_line(schedule, config, overrides, address, python=interpreter(cfg, cfg.launch.ray.python),
                        env=ray_env(cfg, address), log=RunDir(cfg.run_dir).schedule_log, stage=stage)
