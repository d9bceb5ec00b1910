"""The one rule for "can this checkpoint continue this run": every problem, as a list of lines.

`resume_problems` is called in the launching process before any rank starts (`pretrain train`'s
pre-launch check), by `pretrain plan`, by `pretrain eval` (dataset rule only) and by the ranks'
own resume plan. It reads only the typed records (trainer_state.json, manifest.json) and the config;
it imports neither torch nor DeepSpeed, so it runs in a second.

A checkpoint continues a run when:

- it was trained on this dataset, or on one this dataset grew from by `prepare --append` (the
  manifest's ``lineage``), and it carries the data eras that make the growth exact;
- the global batch is the same (the sample order is a function of it);
- the ZeRO stage is the same, or switches between 1 and 2 (DeepSpeed lays out ZeRO-0 and ZeRO-3
  checkpoints differently);
- the model is the same, up to fields that do not change the weights (dropout, recompute).

A different world size is not a problem: it resumes through a universal checkpoint (resume.py).

The same module holds the rule for "does this config train on this prepared dataset"
(`dataset_config_problems`): the config's data section may differ from the one the dataset was
prepared with only in fields that change how the data is written, never which tokens it holds
(`DATA_HOW_FIELDS`; `pretrain plan` warns and `pretrain train` refuses with the same list), and a
changed LR schedule on resume follows ``optim.on_resume_schedule_change`` (`schedule_problem`).
"""

from __future__ import annotations

from pipeline.config import ConfigError, DataConfig, ModelConfig, PipelineConfig
from pipeline.data.manifest import Manifest
from pipeline.train.records import TrainerState
from pipeline.train.schedule import schedule_changes

#: model fields that do not change the weights' shapes or values
VOLATILE_MODEL_FIELDS = ("activation_checkpointing", "dropout", "attn_dropout", "attention_kernel")
#: data fields (dotted, under ``data.``) that change how a dataset is written or where it lives, never
#: which tokens it holds: a config may differ from the prepared dataset in these
DATA_HOW_FIELDS = ("output_dir", "executor", "num_cpus", "local_max_bytes", "block_bytes", "shard_max_tokens",
                   "tokenizer.fast_encoder", "max_quarantine_share",
                   "document_masking")  # how training reads the samples, not what the dataset holds
FALLBACK_HINT = ("use a new run_dir, or the original config and data.output_dir (a dataset grown with "
                 "`pretrain prepare --append` continues the run)")


def resolve_model_config(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Fill in the vocabulary from the tokenizer, padded to a multiple for fast matmuls."""
    if model.vocab_size is not None:
        if model.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab})"
            )
        return model
    m = model.pad_vocab_to_multiple_of
    return model.model_copy(update={"vocab_size": -(-tokenizer_vocab // m) * m})


def dataset_problem(saved: TrainerState, manifest: Manifest | None, manifest_sha: str) -> str | None:
    """Why the checkpoint's dataset is not this one (nor an ancestor of it), or None. Without the
    ``manifest`` itself only the same dataset continues (its lineage is unknown)."""
    trained_on = saved.data_manifest_sha256
    if trained_on == manifest_sha:
        return None
    if manifest is not None and trained_on in manifest.lineage and saved.data_eras:
        return None
    return (f"was trained on a different dataset (manifest sha256 {trained_on[:12] or '?'}… vs "
            f"{manifest_sha[:12]}…)")


def model_problems(saved: TrainerState, model: ModelConfig) -> list[str]:
    if not saved.model:
        return []
    try:  # fields a checkpoint of an older version lacks count as their defaults
        saved_model = ModelConfig.model_validate(saved.model).model_dump(mode="json")
    except ValueError:
        saved_model = dict(saved.model)
    before = {k: v for k, v in saved_model.items() if k not in VOLATILE_MODEL_FIELDS}
    now = {k: v for k, v in model.model_dump(mode="json").items() if k not in VOLATILE_MODEL_FIELDS}
    return [f"model.{k}: checkpoint {before.get(k)!r}, config {now.get(k)!r}"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def resume_problems(cfg: PipelineConfig, saved: TrainerState, manifest: Manifest | None = None,
                    manifest_sha: str | None = None) -> list[str]:
    """Every reason the checkpoint whose state is ``saved`` cannot continue ``cfg``'s run, one line
    each (empty: it can). ``manifest_sha``: the sha256 of the manifest of the dataset the run would
    train on (None: not checked, e.g. the data is not prepared yet); ``manifest``: that manifest (its
    lineage, and its vocabulary for the model comparison)."""
    problems = []
    if manifest_sha is not None:
        data = dataset_problem(saved, manifest, manifest_sha)
        if data:
            problems.append(data)
    saved_batch = saved.global_batch_size if saved.global_batch_size is not None else cfg.train.global_batch_size
    if saved_batch != cfg.train.global_batch_size:
        problems.append(f"train.global_batch_size: checkpoint {saved_batch}, config {cfg.train.global_batch_size} "
                        f"(keep the global batch to resume: the sample order depends on it)")
    stage = cfg.train.zero_stage
    saved_stage = saved.zero_stage if saved.zero_stage is not None else stage
    if saved_stage != stage and {saved_stage, stage} != {1, 2}:
        problems.append(f"written with ZeRO-{saved_stage}, this run uses ZeRO-{stage}; only ZeRO-1 ↔ ZeRO-2 can "
                        f"be switched on resume (DeepSpeed lays out ZeRO-0 and ZeRO-3 checkpoints differently); "
                        f"keep train.zero_stage={saved_stage} for this run_dir")
    if manifest is not None and manifest.tokenizer.vocab_size is not None:
        try:
            model = resolve_model_config(cfg.model, manifest.tokenizer.vocab_size)
        except ConfigError:
            model = None  # the config itself is wrong: its own check reports it
        if model is not None:
            problems.extend(model_problems(saved, model))
    return problems


def describe(checkpoint_path, problems: list[str]) -> str:
    """One line: the checkpoint, every problem, the way out."""
    if len(problems) == 1 and "; " in problems[0]:  # the problem already says what to do
        return f"{checkpoint_path}: {problems[0]}"
    return f"{checkpoint_path}: cannot continue this run: " + "; ".join(problems) + f"; {FALLBACK_HINT}"


# ---------------------------------------------------------------------------- config vs. dataset


def _flat(value, prefix: str = "") -> dict[str, object]:
    """A JSON tree as {dotted key: leaf}; list items are numbered (``sources.0.path``)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, object] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out or {prefix: value}


def _ignored(key: str, grown: bool) -> bool:
    parts = key.split(".")
    if key in DATA_HOW_FIELDS or parts[0] in DATA_HOW_FIELDS:
        return True
    # training reads the sources of the manifest, whatever the config lists (weights go by name):
    # a different list is said by `source_differences`, not refused
    if parts[0] == "sources":
        return True
    # an append cleans and deduplicates its new files with the config of the day (docs/continued-
    # pretraining.md); the manifest records the first generation's settings only
    return grown and parts[0] in ("clean", "dedup")


def data_config_changes(recorded: dict, data: DataConfig, grown: bool = False) -> list[str]:
    """Fields of ``data`` (dotted, without ``data.``) that differ from the data section the dataset was
    prepared with (``recorded``, the manifest's ``config``; none when it records none) and change the
    tokens of the prepared sources: the tokenizer, cleaning, dedup, the validation share. ``grown``:
    the dataset grew by `prepare --append` (whose new files follow the config's cleaning and dedup)."""
    if not recorded:
        return []
    before, now = _flat(dict(recorded)), _flat(data.model_dump(mode="json"))
    # a key only one side has is a field another version added or removed, not a change
    return sorted(k for k in before.keys() & now.keys() if before[k] != now[k] and not _ignored(k, grown))


def source_differences(cfg: PipelineConfig, manifest: Manifest) -> str | None:
    """How the config's source list differs from the prepared dataset's, or None (a warning: training
    draws from the prepared sources, blended by the weights of the configured ones of the same name)."""
    names = [s.resolved_name for s in cfg.data.sources]
    prepared = [s.name for s in manifest.sources]
    missing, extra = [n for n in names if n not in prepared], [n for n in prepared if n not in names]
    if not (missing or extra):
        return None
    return (f"data.sources {names} are not the prepared dataset's {prepared}: training draws from the prepared "
            f"ones" + (f" ({extra} at weight 1)" if extra else "") + "; `pretrain prepare --append` adds new "
            f"sources, `pretrain prepare --force` rebuilds")


def dataset_config_problems(cfg: PipelineConfig, manifest: Manifest) -> list[str]:
    """Every reason ``cfg`` would not train on what the prepared dataset holds (empty: it does)."""
    prepared = [s.name for s in manifest.sources]
    if not cfg.data.sources:
        return [f"data.sources is empty, but {cfg.data.output_dir} was prepared from sources {prepared}"]
    problems = []
    changed = data_config_changes(manifest.config, cfg.data, grown=bool(manifest.appends))
    if changed:
        before, now = _flat(dict(manifest.config)), _flat(cfg.data.model_dump(mode="json"))
        shown = [f"data.{k} (prepared {before.get(k)!r}, config {now.get(k)!r})" if k in before and k in now
                 else f"data.{k}" for k in changed]
        problems.append(f"{', '.join(shown)} {'differs' if len(shown) == 1 else 'differ'} from what "
                        f"{cfg.data.output_dir} was prepared with")
    return problems


def describe_dataset_problems(cfg: PipelineConfig, problems: list[str]) -> str:
    """One line: what disagrees, and the way out."""
    if not cfg.data.sources:
        return problems[0] + "; list the sources to train on in data.sources (as they were prepared)"
    return ("the config's data section does not match the prepared dataset: " + "; ".join(problems)
            + f"; run `pretrain prepare` again to rebuild {cfg.data.output_dir} for this config (or point "
            f"data.output_dir elsewhere), or restore the fields it was prepared with")


def schedule_problem(cfg: PipelineConfig, saved: TrainerState) -> str | None:
    """Why the run may not resume with a changed LR schedule (``on_resume_schedule_change: refuse``)."""
    changed = schedule_changes(saved.lr_schedule, cfg.optim, cfg.train.max_steps)
    if not changed or cfg.optim.on_resume_schedule_change != "refuse":
        return None
    return (f"the LR schedule differs from the checkpoint's ({', '.join(changed)}) and "
            f"optim.on_resume_schedule_change is refuse: set it to continue (keep the checkpoint's LR and decay "
            f"over the remaining steps) or restart (a new warmup from it), or restore the schedule")


def precision_problem(precision: str, cuda_available: bool) -> str | None:
    """Why this machine cannot train in ``precision`` (fp16 needs a GPU), or None."""
    if precision == "fp16" and not cuda_available:
        return ("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 kernels); use bf16 "
                "on CPU")
    return None
