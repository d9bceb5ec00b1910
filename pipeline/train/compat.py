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
"""

from __future__ import annotations

from pipeline.config import ConfigError, ModelConfig, PipelineConfig
from pipeline.data.manifest import Manifest
from pipeline.train.records import TrainerState

#: model fields that do not change the weights' shapes or values
VOLATILE_MODEL_FIELDS = ("activation_checkpointing", "dropout", "attn_dropout", "attention_kernel")
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
