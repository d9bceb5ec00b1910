"""What every cluster target shares: absolute paths, the stage commands, the project files to ship."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.storage import open_storage

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STAGES = ("all", "prepare", "train", "eval")
# shipped with a Ray job (working_dir) and copied into the images; never the venv, runs or data
SHIPPED = ("pipeline", "configs", "pyproject.toml", "constraints.txt")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?LW#]+$")


class SubmitError(UserError, RuntimeError):
    """The cluster could not be reached, or its tool (sbatch, kubectl, the Jobs API) refused the job."""


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:  # an object-store URI is the same from every node
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def absolute_paths(cfg: PipelineConfig, base: Path | None = None) -> PipelineConfig:
    """The config with run_dir, data.output_dir and every input path made absolute (relative paths
    are resolved against ``base``, the submitting directory), so a job on another node or in
    another working directory reads and writes the same places."""
    base = base or Path.cwd()
    data = cfg.data.model_copy(update={
        "output_dir": _absolute(cfg.data.output_dir, base),
        "sources": [s.model_copy(update={"path": _absolute(s.path, base)}) for s in cfg.data.sources],
        "tokenizer": cfg.data.tokenizer.model_copy(update={"path": _absolute(cfg.data.tokenizer.path, base)}),
    })
    return cfg.model_copy(update={"run_dir": _absolute(cfg.run_dir, base), "data": data})


def interpreter(cfg: PipelineConfig, specific: str | None = None) -> str:
    """The Python a job runs: the target's own setting (launch.slurm.python, launch.ray.python), else
    launch.python, else the interpreter running `pretrain submit` (its virtualenv, activated or not)."""
    return specific or cfg.launch.python or sys.executable


def workdir() -> Path:
    """Where a job runs: the directory `pretrain submit` was run in (as sbatch does by default), the
    one relative paths were resolved against."""
    return Path.cwd().resolve()


def env_file(path: Path, values: dict[str, str]) -> Path:
    """A shell file of ``export NAME=value`` lines, readable by its owner only (it may hold a token);
    printed commands source it instead of repeating a secret on the screen or in a crontab."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    return path


def logged(command: str, log: Path) -> str:
    """``command`` with its output appended to ``log`` (a crontab line has no terminal)."""
    return f"{command} >> {shlex.quote(str(log))} 2>&1"


def stage_commands(python: str, config: str, run_dir: str, stage: str, train_module: str = "pipeline.cli") -> list[str]:
    """Shell commands of the stages: prepare → train → eval (or just one)."""
    if stage not in STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    py, cfg, run = shlex.quote(python), shlex.quote(config), shlex.quote(run_dir)
    train = (f"{py} -m pipeline.cli train {cfg}" if train_module == "pipeline.cli"
             else f"{py} -m {train_module} {cfg}")
    commands = {
        # --append: prepare the dataset if there is none, else add the new input files only; a job
        # that fires again (schedule, requeue) never rebuilds the data a run is training on
        "prepare": f"{py} -m pipeline.cli prepare {cfg} --append",
        "train": train,
        "eval": f"{py} -m pipeline.cli eval {run}",
    }
    return list(commands.values()) if stage == "all" else [commands[stage]]


def check_cron(expr: str) -> str:
    """Five cron fields (minute hour day month weekday), as Kubernetes, KubeRay and crontab take."""
    fields = expr.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise ConfigError(f"--schedule {expr!r}: expected five cron fields 'MIN HOUR DAY MONTH WEEKDAY', "
                          f"e.g. '0 */6 * * *' (every six hours)")
    return " ".join(fields)


def stage_project(dest: Path, config_yaml: str) -> Path:
    """Copy the code and presets into ``dest`` with the resolved config as submitted/config.yaml."""
    for name in SHIPPED:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    submitted = RunDir(dest).submitted  # the job's working directory keeps the run's layout
    open_storage(submitted).write_atomic(RunDir.CONFIG, config_yaml)
    return submitted / RunDir.CONFIG
