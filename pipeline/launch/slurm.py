"""`pretrain submit --to slurm`: render launch/slurm/train.sbatch and hand it to sbatch.

The script runs prepare and eval on the first node, and training as one `srun` step with one
torchrun per node (c10d rendezvous on the first host of ``scontrol show hostnames``). It asks for
``--requeue`` and ``--signal=B:USR1@N``: on USR1 it stops the ranks and requeues itself, and the next
start resumes from the newest committed checkpoint. With ``--schedule`` a scrontab entry submits the
script at each firing (``--dependency=singleton``: never two at once).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, to_yaml
from pipeline.launch.cluster import PROJECT_ROOT, SubmitError, absolute_paths, interpreter, stage_commands, workdir
from pipeline.rundir import RunDir
from pipeline.storage import open_storage

_FIELD = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill ``{{name}}`` fields; a field the template names but we do not know is an error."""
    missing = sorted({m.group(1) for m in _FIELD.finditer(text)} - set(values))
    if missing:
        raise ConfigError(f"launch.slurm.template: unknown field(s) {missing}; known: {sorted(values)}")
    return _FIELD.sub(lambda m: values[m.group(1)], text)


def job_name(cfg: PipelineConfig) -> str:
    return "pretrain-" + re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.name)


def render_sbatch(cfg: PipelineConfig, config_path: str, stage: str = "all") -> str:
    """The sbatch script for ``cfg`` (paths already absolute), reading its config from ``config_path``."""
    s, launch = cfg.launch.slurm, cfg.launch
    template = Path(s.template) if Path(s.template).is_absolute() else PROJECT_ROOT / s.template
    if not template.is_file():
        raise ConfigError(f"launch.slurm.template: no such file: {template}")
    extra = []
    if launch.gpus_per_node:
        extra.append(f"#SBATCH --gpus-per-node={launch.gpus_per_node}")
    if s.partition:
        extra.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        extra.append(f"#SBATCH --account={s.account}")
    ranks = launch.ranks_per_node(cfg.train)
    py, conf = shlex.quote(interpreter(cfg, s.python)), shlex.quote(config_path)
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: after a restart (launch.max_restarts) each rendezvous round
    # gets a new store for the process group; in the shared one a restarted rank could read the
    # address a dead rank published in the round before, and fail again
    torchrun = (f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 --export=ALL,TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                f"{py} -m torch.distributed.run "
                f"--nnodes=\"$SLURM_JOB_NUM_NODES\" --nproc-per-node={ranks} --max-restarts={launch.max_restarts} "
                f"--rdzv-backend=c10d "
                f"--rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" --rdzv-id=\"$SLURM_JOB_ID\" "
                f"-m pipeline.cli train {conf}")
    commands = stage_commands(interpreter(cfg, s.python), config_path, cfg.run_dir, stage)
    commands = [torchrun if " pipeline.cli train " in c else c for c in commands]
    values = {
        "job_name": job_name(cfg),
        "nodes": str(launch.nodes),
        "cpus_per_task": str(s.cpus_per_task),
        "time_limit": s.time_limit,
        # a run on an object store has no folder the nodes share: the log stays on the job's first node
        "log_dir": "/tmp" if RunDir(cfg.run_dir).remote else str(RunDir(cfg.run_dir).slurm_logs),
        "signal_lead_s": str(s.signal_lead_s),
        "extra_sbatch": "\n".join(extra),
        "ranks_per_node": str(ranks),
        "rdzv_port": str(launch.rdzv_port),
        "workdir": shlex.quote(str(workdir())),
        "stages": "\n".join(f"stage {c}" for c in commands),
    }
    return render_template(template.read_text(encoding="utf-8"), values)


def scrontab_entry(cfg: PipelineConfig, schedule: str, script: Path) -> str:
    """A scrontab block that submits ``script`` at each firing; marked so a resubmit replaces it."""
    name = job_name(cfg)
    return "\n".join([
        f"# {name} begin (pretrain submit --to slurm --schedule)",
        f"#SCRON --job-name={name}-cron --time=00:05:00 --cpus-per-task=1",
        crontab_line(cfg, schedule, script),
        f"# {name} end",
    ])


def crontab_line(cfg: PipelineConfig, schedule: str, script: Path) -> str:
    """The plain-cron alternative to scrontab, for a login node's crontab. cron's PATH is /usr/bin:/bin:
    sbatch by its full path when it lives elsewhere. (The job needs no secret: munge authenticates it.)"""
    sbatch = shutil.which("sbatch") or "sbatch"
    if Path(sbatch).parent in (Path("/usr/bin"), Path("/bin")):
        sbatch = "sbatch"
    return f"{schedule} {sbatch} --dependency=singleton --job-name={job_name(cfg)} {shlex.quote(str(script))}"


def merge_scrontab(existing: str, block: str, name: str) -> str:
    """Replace the block for ``name`` in a scrontab, or append it."""
    pattern = re.compile(rf"^# {re.escape(name)} begin.*?^# {re.escape(name)} end\n?", re.S | re.M)
    kept = pattern.sub("", existing).rstrip("\n")
    return (kept + "\n" if kept else "") + block + "\n"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SubmitError(f"`{name}` is not on PATH: run on a Slurm login node, or use --dry-run to see the script")
    return path


def _install_scrontab(cfg: PipelineConfig, block: str) -> None:
    scrontab = _tool("scrontab")
    current = subprocess.run([scrontab, "-l"], capture_output=True, text=True)
    existing = current.stdout if current.returncode == 0 else ""
    merged = merge_scrontab(existing, block, job_name(cfg))
    with tempfile.NamedTemporaryFile("w", suffix=".scrontab", delete=False) as f:
        f.write(merged)
    done = subprocess.run([scrontab, f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    if done.returncode != 0:
        raise SubmitError(f"scrontab refused the entry: {done.stderr.strip() or done.stdout.strip()} "
                          f"(scrontab needs ScronParameters=enable in slurm.conf)")


def submit(cfg: PipelineConfig, *, stage: str = "all", dry_run: bool = False, wait: bool = False,
           schedule: str | None = None, out=print) -> int:
    cfg = absolute_paths(cfg)
    run = RunDir(cfg.run_dir)
    tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # two submits in one second keep their files
    config_name, script_name = f"slurm-{tag}.yaml", f"slurm-{tag}.sbatch"
    script_path = run.submitted / script_name
    config_ref = str(run.submitted / config_name)
    if run.remote:  # no shared filesystem: every node reads the job's config from the store
        run.remote_storage.write_atomic(f"submitted/{config_name}", to_yaml(cfg))
        config_ref = run.where(f"submitted/{config_name}")
    script = render_sbatch(cfg, config_ref, stage)
    # on --dry-run too: every file the script names exists, so it can be sbatch'ed by hand
    open_storage(run.slurm_logs).makedirs()  # sbatch writes the job's log there from its first line
    submitted = open_storage(run.submitted)
    submitted.write_atomic(config_name, to_yaml(cfg))
    submitted.write_atomic(script_name, script)
    if dry_run:
        out(script)
        if schedule:
            out(scrontab_entry(cfg, schedule, script_path))
        print(f"pretrain submit: saved {script_path} (and its config); submit it by hand with "
              f"`sbatch {shlex.quote(str(script_path))}`", file=sys.stderr)
        return 0
    if schedule and shutil.which("scrontab") is None:  # e.g. Debian's slurm-client ships no scrontab
        out(f"# this Slurm has no scrontab: add this line to the crontab (crontab -e) of this login node;\n"
            f"# each firing submits {script_path}, never two at once (--dependency=singleton)")
        out(crontab_line(cfg, schedule, script_path))
        return 0
    if schedule:
        _install_scrontab(cfg, scrontab_entry(cfg, schedule, script_path))
        out(f"scheduled {script_path} with scrontab ('{schedule}'); see it with `scrontab -l`")
        return 0
    return _sbatch(cfg, script_path, wait, out)


def _sbatch(cfg: PipelineConfig, script_path: Path, wait: bool, out) -> int:
    done = subprocess.run([_tool("sbatch"), "--parsable", str(script_path)], capture_output=True, text=True)
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode != 0 or not job_id:
        raise SubmitError(f"sbatch refused {script_path}: {done.stderr.strip()}")
    out(f"submitted Slurm job {job_id}: {script_path}")
    logs = "/tmp (on the job's first node)" if RunDir(cfg.run_dir).remote else RunDir(cfg.run_dir).slurm_logs
    out(f"  follow its log: tail -f {logs}/{job_name(cfg)}-{job_id}.out")
    out(f"  status / stop:  squeue -j {job_id} / scancel {job_id}")
    if not wait:
        return 0
    state, exit_code = wait_for_job(job_id)
    out(f"Slurm job {job_id}: {state} (exit code {exit_code})")
    return 0 if state == "COMPLETED" else 1


_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_for_job(job_id: str, poll_s: float = 2.0) -> tuple[str, str]:
    """Poll ``scontrol show job`` until the job ends (a requeued job goes on); (state, exit code).
    (`sbatch --wait` would do, but it polls at up to 32 s intervals.)"""
    scontrol = _tool("scontrol")
    while True:
        shown = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
        fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
        state = fields.get("JobState", "")
        if shown.returncode != 0 or not state:
            raise SubmitError(f"Slurm no longer knows job {job_id} ({shown.stderr.strip()}); see its log")
        if state in _FINAL:
            return state, fields.get("ExitCode", "?")
        time.sleep(poll_s)
