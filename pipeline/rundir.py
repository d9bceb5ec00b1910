"""RunDir and DatasetDir: the only code that knows the on-disk layout of a run and of a dataset.

Every other module asks these objects for a key (a path relative to the directory) or a `Storage`
to read and write it; none spells ``"checkpoints"`` or ``step_%08d`` itself.

    RUN_DIR/                                   DATA_DIR/  (data.output_dir)
      config.yaml        resolved config         manifest.json      the commit point of a dataset
      run.lock           trainer lease           tokenizer.json
      metrics.jsonl      train metrics           quarantine.jsonl   (+ quarantine-appendN.jsonl)
      eval_metrics.jsonl eval metrics            duplicates.jsonl   (+ duplicates-appendN.jsonl)
      eval/step_N.json   eval records            train/SOURCE-00000.{bin,idx}
      eval/run.lock      eval-job lease          validation/SOURCE-00000.{bin,idx}
      checkpoints/                               .stages/NAME.json  stage completion records
        latest           a hint, never the truth .stages/dedup-filtered.npy
        step_N/COMMIT    the commit point        .dedup-spill/      dedup scratch
        step_N/…         engine, weights, state  .append-staging/   a dataset being appended
        .tmp-step_N/     a save in flight
        .universal/      a converted checkpoint
      wandb/  report.html  report.png  submitted/  slurm/  ray_train/
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.objstore import is_uri, mirror_path, mirrored_uri
from pipeline.storage import STAGING_PREFIX, LocalStorage, open_storage

_STEP = re.compile(r"^step_(\d{8,})$")
_EVAL_RECORD = re.compile(r"^step_(\d{8,})\.json$")


def tag_for(step: int) -> str:
    """The directory name of step ``step``'s checkpoint: ``step_00000100``."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for, None when it is not one."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def staged_step_of(name: str) -> int | None:
    """The step of a checkpoint directory or of its staging directory (``.tmp-step_N``)."""
    return step_of(name.removeprefix(STAGING_PREFIX))


def _mirrored(obj, root, kind: str) -> None:
    """``root`` a path: the directory itself. ``root`` a URI (``s3://…``): ``root`` becomes this
    node's local mirror of it and ``remote`` the URI (`pipeline.mirror` keeps the two in step)."""
    if is_uri(root):
        object.__setattr__(obj, "remote", str(root).rstrip("/"))
        object.__setattr__(obj, "root", mirror_path(str(root), kind))
    else:
        object.__setattr__(obj, "remote", mirrored_uri(root, kind))
        object.__setattr__(obj, "root", Path(root))


@dataclass(frozen=True)
class RunDir:
    """A run directory (``run_dir``): checkpoints, logs, eval records, locks."""

    root: Path
    remote: str | None = None  # the object-store URI this run lives at; ``root`` is then its local mirror

    CHECKPOINTS = "checkpoints"
    CONFIG = "config.yaml"
    LOCK = "run.lock"
    LOCK_GUARD = "run.lock.guard"
    METRICS = "metrics.jsonl"
    EVAL_METRICS = "eval_metrics.jsonl"
    EVAL_DIR = "eval"
    EVAL_JSON = "eval.json"  # inside a checkpoint: it was evaluated
    LATEST = "latest"
    COMMIT = "COMMIT"
    UNIVERSAL = ".universal"
    ASIDE = ".aside"  # inside checkpoints/: checkpoints moved out of the way (checkpoint.resume_from)
    EVAL_MISSED = "eval/deleted_unevaluated.jsonl"  # retention deleted these while an eval job ran
    LAST_RUN = "last_run.json"  # how the last `pretrain train` on the run ended (launch/preamble.py)

    def __init__(self, root: str | Path):
        _mirrored(self, root, "runs")

    @property
    def storage(self) -> LocalStorage:
        return open_storage(self.root)

    def path(self, key: str = "") -> Path:
        return self.storage.path(key)

    @property
    def remote_storage(self):
        """The object store behind the mirror (`pipeline.objstore.ObjectStorage`), None for a local run."""
        return open_storage(self.remote) if self.remote else None

    def where(self, key: str = "") -> str:
        """``key``'s name for messages: its URI on an object store, else its path."""
        return f"{self.remote.rstrip('/')}/{key}".rstrip("/") if self.remote else str(self.path(key))

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def checkpoint_storage(self) -> LocalStorage:
        return self.storage.child(self.CHECKPOINTS)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> RunDir | None:
        """The run a checkpoint directory belongs to (RUN/checkpoints/step_N), None if it is not one."""
        path = Path(path)
        if step_of(path.name) is None or path.parent.name != cls.CHECKPOINTS:
            return None
        return cls(path.parent.parent)

    @property
    def universal_dir(self) -> Path:
        return self.checkpoints / self.UNIVERSAL

    # ---------------------------------------------------------------- files of the run
    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def eval_metrics(self) -> Path:
        return self.root / self.EVAL_METRICS

    @property
    def eval_dir(self) -> Path:
        return self.root / self.EVAL_DIR

    @property
    def eval_lease(self) -> Path | str:
        """Where the eval job's lease lives: on the store for a run there (every node must see it)."""
        return f"{self.remote}/{self.EVAL_DIR}" if self.remote else self.eval_dir

    def eval_record(self, step: int) -> Path:
        return self.eval_dir / f"{tag_for(step)}.json"

    @staticmethod
    def eval_record_step(name: str) -> int | None:
        m = _EVAL_RECORD.match(name)
        return int(m.group(1)) if m else None

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def submitted(self) -> Path:
        return self.root / "submitted"

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    @property
    def schedule_log(self) -> Path:
        """What each firing of a crontab line from `pretrain submit --schedule` printed (appended)."""
        return self.root / "schedule.log"

    @property
    def ray_env(self) -> Path:
        """The environment `ray job ...` needs for this run's cluster (address, auth); mode 0600."""
        return self.submitted / "ray.env"

    @staticmethod
    def launch_starts(launch_id: str) -> str:
        """Key of how often one launch (a Slurm allocation, a torchrun, a Ray Train fit) started its
        ranks training: 1 + its automatic restarts (launch.max_restarts)."""
        return f"launches/{launch_id}.starts"


@dataclass(frozen=True)
class DatasetDir:
    """A prepared dataset (``data.output_dir``): shards, tokenizer, quarantine, stage records."""

    root: Path
    remote: str | None = None  # the object-store URI of the dataset; ``root`` is then its local mirror

    MANIFEST = "manifest.json"
    TOKENIZER = "tokenizer.json"
    QUARANTINE = "quarantine.jsonl"
    DUPLICATES = "duplicates.jsonl"
    STAGES = ".stages"
    FILTERED = ".stages/dedup-filtered.npy"  # the dedup pass's filter verdicts: [doc id, filter index]
    DEDUP_SPILL = ".dedup-spill"
    APPEND_STAGING = ".append-staging"
    LOCK = "prepare.lock"
    SPLITS = ("train", "validation")

    def __init__(self, root: str | Path):
        _mirrored(self, root, "data")

    @property
    def storage(self) -> LocalStorage:
        return open_storage(self.root)

    def path(self, key: str = "") -> Path:
        return self.storage.path(key)

    @property
    def remote_storage(self):
        return open_storage(self.remote) if self.remote else None

    def where(self, key: str = "") -> str:
        return f"{self.remote.rstrip('/')}/{key}".rstrip("/") if self.remote else str(self.path(key))

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    def stage_record(self, name: str) -> str:
        return f"{self.STAGES}/{name}.json"

    @staticmethod
    def shard_prefix(split: str, source: str, index: int) -> str:
        """``train/web-00003``: the key of a shard without its ``.bin``/``.idx`` extension."""
        return f"{split}/{source}-{index:05d}"

    @staticmethod
    def appended(name: str, generation: int) -> str:
        """``quarantine-append2.jsonl``: the file an append writes beside ``name``."""
        stem, _, ext = name.rpartition(".")
        return f"{stem}-append{generation}.{ext}"

    @property
    def staging(self) -> DatasetDir:
        """Where `prepare --append` prepares the new files before moving them in."""
        return DatasetDir(self.root / self.APPEND_STAGING)

    def staged(self, key: str) -> str:
        """The key (in this dataset's storage) of ``key`` of the `staging` dataset."""
        return f"{self.APPEND_STAGING}/{key}"
