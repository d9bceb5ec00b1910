"""One typed configuration tree for every stage, loaded from YAML with dotted overrides.

Every section forbids unknown keys, so a typo fails at load time naming the field instead of being
silently ignored. The DeepSpeed JSON is generated from this tree (``train/engine.py``); users never
write it by hand.

A YAML file may name other files under ``base:`` (paths relative to that file); they are merged
first, in order, and the file's own keys win. ``--set a.b=value`` overrides are applied last, with
``value`` parsed as YAML (``--set train.max_steps=10``, ``--set optim.betas=[0.9,0.95]``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config: the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SourceConfig(Section):
    path: str = Field(description="A jsonl file (one JSON object per line).")
    text_field: str = Field("text", description="Key of the document text in each record.")


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=256, le=4_294_967_295, description="Target vocabulary size.")
    min_frequency: int = Field(2, ge=1, description="BPE merges need at least this many occurrences.")
    eod_token: str = Field("<|endoftext|>", description="Appended after every document.")
    train_sample_docs: int | None = Field(
        None, ge=1, description="Train the tokenizer on the first N kept documents (None: all)."
    )


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="Raw corpora to read.")
    output_dir: str = Field("data/default", description="Where shards and manifest.json go.")
    validation_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of documents routed to the validation split."
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the embedded Ray runtime.")


class ModelConfig(Section):
    """Architecture of the network. Sizes are named like GPT-2 / nanoGPT; see configs/models/."""

    arch: Literal["gpt", "bert"] = Field(
        "gpt",
        description="gpt: causal, pre-LN (GPT-2). bert: bidirectional, post-LN, masked-LM head (BERT).",
    )
    n_layer: int = Field(2, ge=1, description="Number of Transformer blocks.")
    n_head: int = Field(2, ge=1, description="Attention heads per block.")
    d_model: int = Field(128, ge=8, description="Hidden size; must be divisible by n_head.")
    d_ff: int | None = Field(None, ge=1, description="Feed-forward width (None: 4 * d_model).")
    max_seq_len: int = Field(1024, ge=8, description="Number of learned position embeddings.")
    vocab_size: int | None = Field(
        None,
        ge=8,
        description="Tokenizer vocabulary (None: taken from the prepared tokenizer). The embedding "
        "has padded_vocab_size rows: this rounded up to pad_vocab_to_multiple_of.",
    )
    pad_vocab_to_multiple_of: int = Field(
        64, ge=1, description="Pads the embedding rows to a multiple of this for fast matmuls (1: none)."
    )
    type_vocab_size: int = Field(
        2, ge=1, description="bert only: token-type (segment) embeddings; type 0 unless given."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on embeddings and on each residual branch's output."
    )
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities.")
    layer_norm_eps: float = Field(1e-5, gt=0.0, description="LayerNorm epsilon (GPT-2 1e-5, BERT 1e-12).")
    init_std: float = Field(0.02, gt=0.0, description="Std of the normal weight init (HF initializer_range).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output projection.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in the backward pass (less memory, ~1/3 more "
        "compute); training only.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self

    @property
    def ffn_dim(self) -> int:
        """Feed-forward width with the default applied."""
        return self.d_ff or 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding: vocab_size rounded up to pad_vocab_to_multiple_of."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is not set: resolve it from the tokenizer first")
        m = self.pad_vocab_to_multiple_of
        return -(-self.vocab_size // m) * m


class OptimConfig(Section):
    lr: float = Field(6e-4, gt=0.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final LR as a share of the peak.")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm (0: no clipping).")


class TrainConfig(Section):
    seq_len: int = Field(128, ge=8, description="Tokens per training sample.")
    micro_batch_size_per_gpu: int = Field(8, ge=1)
    global_batch_size: int = Field(16, ge=1, description="Samples per optimizer step, all ranks.")
    max_steps: int = Field(100, ge=1)
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234
    nproc_per_node: int = Field(
        1, ge=1, description="Processes `pretrain train` starts itself when no launcher did."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, else gloo.")
    log_interval_steps: int = Field(10, ge=1)
    dist_timeout_s: int = Field(600, ge=10, description="Collective timeout before a rank gives up.")


class CheckpointConfig(Section):
    save_interval_steps: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1, description="Committed checkpoints kept; older ones are deleted.")


class EvalConfig(Section):
    max_samples: int | None = Field(256, ge=1, description="Validation samples scored (None: all).")
    micro_batch_size: int = Field(8, ge=1)


class TrackingConfig(Section):
    project: str = "pretrain"
    group: str | None = Field(None, description="W&B group shared by train and eval (None: run name).")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline."
    )


class PipelineConfig(Section):
    run_dir: str = Field("runs/default", description="Checkpoints, metrics and W&B files go here.")
    run_name: str | None = Field(None, description="None: the run directory's name.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        if self.train.global_batch_size % self.train.micro_batch_size_per_gpu:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size_per_gpu ({self.train.micro_batch_size_per_gpu})"
            )
        return self

    @property
    def name(self) -> str:
        return self.run_name or Path(self.run_dir).name

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """micro × accumulation × world = global, or a ConfigError naming the fields."""
        per_step = self.train.micro_batch_size_per_gpu * world_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) is not divisible by "
                f"train.micro_batch_size_per_gpu ({self.train.micro_batch_size_per_gpu}) × "
                f"world size ({world_size})"
            )
        return self.train.global_batch_size // per_step


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base` includes itself (cycle through {[str(p) for p in seen]})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / str(base)).resolve()
        merged = _deep_merge(merged, _read_yaml(base_path, seen + (path,)))
    return _deep_merge(merged, raw)


def apply_override(tree: dict, assignment: str) -> dict:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to a raw config dict."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{assignment}`: expected dotted.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{assignment}`: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return tree


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        got = err.get("input")
        shown = "" if err["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{field}: {msg}{shown}")
    return f"invalid config {origin}: " + "; ".join(lines)


def build_config(raw: dict, origin: str = "") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (None: all defaults), apply overrides, validate once."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_config(raw, origin=f"({path})" if path else "(defaults)")


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
