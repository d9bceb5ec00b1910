"""`pretrain export`: a committed checkpoint → a transformers model directory, with its model card.

The directory is what ``save_pretrained`` would write: ``model.safetensors``, ``config.json`` with
bos/eos/pad ids, the dataset's tokenizer with every special token declared (the manifest's
``tokenizer.special_ids``), ``generation_config.json`` for a causal LM (models/hf.py), and a
``README.md`` model card: the data it was trained on, the steps and tokens trained, the
checkpoint's eval results when it was evaluated, and the commands that made it. The export is
logged to W&B as the output of an export run that used the checkpoint (tracking.log_export).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import ModelConfig, PipelineConfig
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.eval.records import EvalRecord, checkpoint_config, record_of
from pipeline.rundir import DatasetDir, RunDir
from pipeline.storage import open_storage
from pipeline.train.checkpoint import TRAINER_STATE, WEIGHTS, CheckpointError, Committed, resolve_checkpoint
from pipeline.train.records import TrainerState

__all__ = ["export_hf", "model_card", "resolve_checkpoint"]

MODEL_CARD = "README.md"


def _dataset(cfg: PipelineConfig) -> tuple[DatasetDir, Manifest | None, Path | None]:
    """The checkpoint's dataset, its manifest and tokenizer file (None where they are gone)."""
    dataset = DatasetDir(cfg.data.output_dir)
    manifest = read_manifest(dataset.root) if dataset.storage.exists(DatasetDir.MANIFEST) else None
    key = manifest.tokenizer.file if manifest is not None else DatasetDir.TOKENIZER
    return dataset, manifest, dataset.storage.local_path(key) if dataset.storage.exists(key) else None


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, log=print, command: str | None = None,
              track: bool = True) -> Path:
    """Write the export of a checkpoint (or of a run directory's newest one); returns ``out_dir``."""
    from safetensors.torch import load

    from pipeline.models.hf import export_to_hf, hf_config

    checkpoint = resolve_checkpoint(checkpoint_path)  # verified against COMMIT
    state = checkpoint.state()
    if state.model is None:
        raise CheckpointError(f"{checkpoint.path / TRAINER_STATE}: no model config recorded (written by an older "
                              f"version); export needs the resolved model config the weights were trained with")
    model_cfg = ModelConfig.model_validate(state.model)
    cfg = checkpoint_config(checkpoint.path)
    dataset, manifest, tokenizer = _dataset(cfg)
    special = manifest.tokenizer.special_ids if manifest is not None and tokenizer is not None else None
    out = export_to_hf(load(checkpoint.storage.read_bytes(WEIGHTS)), model_cfg, out_dir,
                       tokenizer_json=tokenizer, special_ids=special or None)
    hf_class = hf_config(model_cfg)["architectures"][0]
    card = model_card(cfg, model_cfg, checkpoint, state, manifest, record_of(checkpoint.path), hf_class, command,
                      out_name=str(out))
    open_storage(out).write_atomic(MODEL_CARD, card)
    note = "" if tokenizer is not None else f"; tokenizer not found at {dataset.tokenizer}, not copied"
    note += "" if special or tokenizer is None else "; no manifest beside the tokenizer: special tokens not declared"
    log(f"export: {checkpoint.path} → {out} (transformers {hf_class}, model card {MODEL_CARD}){note}")
    if track:
        _track(cfg, checkpoint, state, out, log)
    return out


def _track(cfg: PipelineConfig, checkpoint: Committed, state: TrainerState, out: Path, log) -> None:
    """Lineage in W&B (checkpoint → export). The export itself is done: a W&B failure is one line."""
    from pipeline.tracking import log_export

    run = RunDir.of_checkpoint(checkpoint.path)
    cfg = cfg.model_copy(update={"run_dir": str(run.root)}) if run is not None else cfg
    try:
        log_export(cfg, checkpoint.path, state.wandb_run_id, out, checkpoint.step)
    except Exception as exc:  # noqa: BLE001 (wandb raises its own error types, and OSError)
        log(f"export: the W&B lineage record was not written: {' '.join(str(exc).split())[:300]}")


# --------------------------------------------------------------------------------------- model card


def _front_matter(cfg: PipelineConfig, model_cfg: ModelConfig, hf_class: str) -> list[str]:
    task = "text-generation" if model_cfg.arch == "gpt" else "fill-mask"
    return ["---", "library_name: transformers", f"pipeline_tag: {task}",
            f"tags: [{hf_class}, {model_cfg.arch}, pretrained-from-scratch]", "---", "",
            f"# {cfg.name}: {hf_class}", ""]


def _data_lines(cfg: PipelineConfig, manifest: Manifest | None) -> list[str]:
    lines = ["## Data", "", f"Dataset `{cfg.data.output_dir}`."]
    if manifest is None:
        return lines + ["", "Its manifest.json is gone, so the sources and token counts are not known here.", ""]
    tok = manifest.tokenizer
    lines += [f"Tokenizer: {tok.type or 'unknown'}, {tok.vocab_size} tokens; special tokens "
              + ", ".join(f"`{name}` = {i}" for name, i in sorted(tok.special_ids.items())) + ".",
              "", "| split | source | documents | tokens |", "|---|---|---:|---:|"]
    for split, info in manifest.splits.items():
        lines += [f"| {split} | {name} | {s.documents:,} | {s.tokens:,} |" for name, s in info.sources.items()]
        lines.append(f"| {split} | **all** | {info.documents:,} | {info.tokens:,} |")
    inputs = ", ".join(f"`{s.path or s.name}`" for s in manifest.sources)
    return lines + ["", f"Sources: {inputs}." if inputs else "", ""]


def _training_lines(cfg: PipelineConfig, model_cfg: ModelConfig, checkpoint: Committed,
                    state: TrainerState) -> list[str]:
    from pipeline.models.flops import param_count

    t = cfg.train
    start = f"initialised from `{model_cfg.init_from}`" if model_cfg.init_from else "trained from scratch"
    return ["## Training", "",
            f"- {param_count(model_cfg) / 1e6:.2f}M parameters: {model_cfg.n_layer} layers, d_model "
            f"{model_cfg.d_model}, {model_cfg.n_head} heads, context {model_cfg.max_seq_len} tokens; {start}",
            f"- step {checkpoint.step:,} of {t.max_steps:,}; {state.consumed_samples:,} samples of {t.seq_len} "
            f"tokens = **{state.consumed_samples * t.seq_len:,} tokens trained**",
            f"- global batch {t.global_batch_size}, {t.precision}, ZeRO-{t.zero_stage}, peak lr {cfg.optim.lr:g}",
            f"- checkpoint `{checkpoint.path}`"
            + (f"; W&B run `{state.wandb_run_id}` (project {cfg.tracking.project})" if state.wandb_run_id else ""),
            ""]


def _eval_lines(checkpoint: Committed, record: EvalRecord | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if record is None:
        return lines + [f"Not evaluated: `pretrain eval {checkpoint.path}` writes its eval.json.", ""]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.time)) if record.time else "unknown time"
    lines += [f"`pretrain eval` at step {record.step} ({when}, {record.device or 'unknown device'}):", "",
              "| metric | value |", "|---|---:|"]
    lines += [f"| {key} | {value:.6g} |" for key, value in sorted(record.metrics.items())]
    return lines + [""]


def _provenance_lines(checkpoint: Committed, command: str | None, model_cfg: ModelConfig, out_name: str) -> list[str]:
    task = "text-generation" if model_cfg.arch == "gpt" else "fill-mask"
    made = [f"pretrain train {checkpoint.path / RunDir.CONFIG}   # the resolved config the checkpoint records"]
    if command:
        made.append(command)
    return ["## How it was made", "", "```", *made, "```", "", "## Use", "", "```python",
            "from transformers import pipeline", "", f'pipe = pipeline("{task}", model={json.dumps(out_name)})', "```", ""]


def model_card(cfg: PipelineConfig, model_cfg: ModelConfig, checkpoint: Committed, state: TrainerState,
               manifest: Manifest | None, record: EvalRecord | None, hf_class: str,
               command: str | None = None, out_name: str = ".") -> str:
    """README.md of an export: data, training, evaluation, provenance, use."""
    lines = (_front_matter(cfg, model_cfg, hf_class) + _data_lines(cfg, manifest)
             + _training_lines(cfg, model_cfg, checkpoint, state) + _eval_lines(checkpoint, record)
             + _provenance_lines(checkpoint, command, model_cfg, out_name))
    return "\n".join(lines).rstrip() + "\n"
