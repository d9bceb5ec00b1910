"""One typed configuration tree for every stage, loaded from YAML with dotted overrides.

Every section forbids unknown keys, so a typo fails at load time naming the field instead of being
silently ignored. The DeepSpeed JSON is generated from this tree (``train/engine.py``); users never
write it by hand.

A YAML file may name other files under ``base:``; they are merged first, in order, and the file's
own keys win. An entry is a bundled preset by name (``gpt2-tiny``: ``pretrain presets`` lists them),
or a path relative to the including file, or one relative to the bundled ``configs/``
(``models/gpt2-tiny.yaml``) when no such file is beside it. A base must resolve (symlinks followed) inside the
folder of the config named on the command line or inside the bundled ``configs/`` presets: a
config from elsewhere cannot make the loader read, and echo in its errors, any file on the machine. ``--set a.b=value`` overrides are applied last, with
``value`` parsed as YAML (``--set train.max_steps=10``, ``--set optim.betas=[0.9,0.95]``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError  # noqa: F401 - the config layer's error, defined with its exit code


# the checkout's configs/, or in an installed wheel the same files as pipeline/configs (pyproject.toml)
_PACKAGED_PRESETS = Path(__file__).resolve().parent / "configs"
PRESETS_DIR = _PACKAGED_PRESETS if _PACKAGED_PRESETS.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def _accepts_bool(annotation) -> bool:
    return annotation is bool or annotation is Any or any(_accepts_bool(a) for a in typing.get_args(annotation))


class Section(BaseModel):
    # inf/nan never make sense here (an infinite lr or grace period passes a `gt=0` bound)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        """YAML reads true/yes/on as booleans, which pydantic would quietly turn into 1 or 1.0."""
        if isinstance(value, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number or text, got the boolean {value} (YAML reads yes/no/on/off "
                             f"as booleans)")
        return value


def _directory(path: str) -> str:
    """A directory field: blank would write into the working directory; a URI must name a known
    object store and a bucket."""
    if not path.strip():
        raise ValueError("must name a directory (an empty path would write into the working directory)")
    return _location(path)


def _location(path: str) -> str:
    """A path or an object-store URI (``s3://bucket/prefix``); an unknown scheme is refused here."""
    from pipeline.objstore import is_uri, split_uri

    if is_uri(path):
        split_uri(path)  # a ConfigError naming the URI
    return path


class SourceConfig(Section):
    """One raw corpus: a file, or a directory read file by file in sorted order."""

    path: str = Field(
        description="A file or directory: jsonl (.jsonl/.json/.ndjson, optionally .gz or .zst), parquet, "
        "plain text, or a dataset saved with `datasets.save_to_disk`."
    )
    format: Literal["auto", "jsonl", "parquet", "text", "hf"] = Field(
        "auto",
        description="auto: from each file's suffix (.parquet → parquet, .jsonl/.json/.ndjson[.gz|.zst] → "
        "jsonl, anything else → text); a directory holding a saved HF dataset → hf.",
    )
    text_field: str = Field("text", description="Key (jsonl) or column (parquet, hf) of the document text.")
    text_unit: Literal["file", "paragraph"] = Field(
        "file", description="text format only: one document per file, or per blank-line-separated paragraph."
    )
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Short unique name (None: the file's stem)."
    )
    weight: float = Field(
        1.0, gt=0.0, description="Blend weight: share of training samples drawn from this source."
    )

    @property
    def resolved_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.path).name.split(".")[0]
        return "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem) or "source"


class TokenizerConfig(Section):
    type: Literal["bpe", "wordpiece"] = Field(
        "bpe", description="bpe: byte-level BPE (GPT); wordpiece: lower-cased WordPiece (BERT)."
    )
    path: str | None = Field(
        None, description="Load this tokenizer.json instead of training one (e.g. an exported model's)."
    )
    vocab_size: int = Field(8192, ge=256, le=4_294_967_295, description="Target vocabulary size.")
    min_frequency: int = Field(2, ge=1, description="BPE merges need at least this many occurrences.")
    eod_token: str | None = Field(
        None, description="Appended after every document (None: <|endoftext|> for bpe, [SEP] for wordpiece)."
    )
    train_sample_docs: int | None = Field(
        None, ge=1, description="Train the tokenizer on the first N kept documents (None: all)."
    )
    fast_encoder: bool = Field(
        True, description="Encode byte-level BPE with tiktoken, built from this tokenizer and checked "
        "token for token against `tokenizers` on a sample first (falls back to `tokenizers` otherwise, "
        "and always for wordpiece). Does not change the output.",
    )

    @property
    def eod(self) -> str:
        return self.eod_token or ("[SEP]" if self.type == "wordpiece" else "<|endoftext|>")


class CleanConfig(Section):
    """Unicode normalization and quality filters; a document failing a filter goes to quarantine with
    reason ``filter:<field name>``. Every filter is off (None) unless set; see docs/data.md."""

    normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = Field(
        "NFC", description="Unicode normalization form applied to every document (none: keep as read)."
    )
    min_chars: int | None = Field(None, ge=1, description="Drop documents shorter than this many characters.")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this many characters.")
    min_words: int | None = Field(None, ge=1, description="Drop documents with fewer whitespace-separated words.")
    max_symbol_word_ratio: float | None = Field(
        None, ge=0.0, description="Drop documents whose count of '#' and ellipses ('...', '…') per word "
        "exceeds this (Gopher uses 0.1).",
    )
    min_alpha_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop documents whose letters are less than this share of their "
        "non-whitespace characters.",
    )
    max_repeated_line_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop documents where more than this share of the non-blank "
        "lines repeat an earlier line (Gopher uses 0.3).",
    )


class DedupConfig(Section):
    """Duplicate removal across all sources; the first occurrence (source order, then position) stays."""

    exact: bool = Field(False, description="Remove documents whose normalized text is identical to an earlier one.")
    near: bool = Field(False, description="Remove near-duplicates: MinHash over word n-grams, LSH candidates, "
                       "then an estimated Jaccard similarity check.")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="near: estimated Jaccard similarity of word n-gram sets at or above "
        "which a document is a duplicate.",
    )
    ngram_size: int = Field(5, ge=1, description="near: words per shingle (n-gram).")
    num_perm: int = Field(128, ge=8, le=1024, description="near: MinHash permutations (signature length).")
    bands: int | None = Field(
        None, ge=1, description="near: LSH bands (rows per band = num_perm // bands); None: chosen so the "
        "LSH threshold sits at `threshold`.",
    )
    seed: int = Field(1, ge=0, description="near: seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupConfig:
        if self.bands is not None and self.bands > self.num_perm:
            raise ValueError(f"dedup.bands ({self.bands}) cannot exceed dedup.num_perm ({self.num_perm})")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="Raw corpora to read.")
    output_dir: str = Field("data/default", description="Where shards and manifest.json go.")
    validation_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of documents routed to the validation split."
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shard_max_tokens: int = Field(
        50_000_000, ge=1024, description="Start a new .bin/.idx shard after this many tokens."
    )
    executor: Literal["auto", "ray", "local"] = Field(
        "auto",
        description="What runs the stages. ray: Ray Data workers (embedded Ray, or the cluster at "
        "--ray-address / RAY_ADDRESS). local: no Ray; the same stage functions in num_cpus processes "
        "forked from the driver (one machine). auto: local when no Ray address is given, Ray is not "
        "already running in this process and the input files total at most local_max_bytes on disk; "
        "else ray. Does not change the output.",
    )
    local_max_bytes: int = Field(
        256 << 20, ge=0, description="executor auto: inputs up to this many bytes on disk (compressed "
        "size, summed over every source file) run locally; larger ones on Ray.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs to use: worker processes of the local executor, or CPUs of the "
        "embedded Ray runtime (None: all of this machine's).",
    )
    block_bytes: int = Field(
        1 << 20, ge=4096, description="Target size of a block of text (the unit of work of a worker); "
        "smaller blocks spread one large file over more workers. Does not change the output.",
    )
    document_masking: bool = Field(
        False, description="Training reads packed samples document by document: each document's positions "
        "start at 0 and it attends only to itself; gpt gets no label across a document end, bert rows are "
        "packed as [CLS] piece [SEP] ... without padding (docs/data.md). Does not change the prepared data. "
        "On in the llama-* and modernbert-* presets.",
    )
    max_quarantine_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Fail prepare when a source sends more than this share of its "
        "records to quarantine (a source that keeps no document always fails). Dirty data loses a few "
        "percent; a source losing most of its records is almost always misread (a wrong text_field, "
        "format or compression, a corrupt file), and training would silently leave it out of its blend. "
        "Raise it for a raw crawl whose quality filters drop most documents.",
    )

    @field_validator("output_dir")
    @classmethod
    def _not_blank(cls, path: str) -> str:
        return _directory(path)

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.resolved_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, {dupes} repeat (set `name:` on each)")
        return self


class ModelConfig(Section):
    """Architecture of the network. Sizes are named like GPT-2 / nanoGPT; see configs/models/.

    The defaults are the textbook GPT-2 / BERT. Each field after ``activation_checkpointing`` swaps
    one part for a newer one; together they make a Llama-style decoder (``arch: gpt``, rope, rmsnorm,
    swiglu, n_kv_heads, no biases) or a ModernBERT-style encoder (``arch: bert``, pre-norm, rope,
    geglu, no biases, local attention); see configs/models/llama-*.yaml and modernbert-*.yaml.
    """

    arch: Literal["gpt", "bert"] = Field(
        "gpt",
        description="The objective. gpt: causal language model (GPT-2; Llama with the options below). "
        "bert: bidirectional encoder with a masked-LM head (BERT; ModernBERT with the options below).",
    )
    n_layer: int = Field(2, ge=1, description="Number of Transformer blocks.")
    n_head: int = Field(2, ge=1, description="Attention (query) heads per block.")
    d_model: int = Field(128, ge=8, description="Hidden size; must be divisible by n_head.")
    d_ff: int | None = Field(
        None, ge=1,
        description="Feed-forward width; for swiglu/geglu the width of each of the two branches (None: "
        "4 * d_model for gelu; for gated MLPs 8/3 * d_model rounded up to ffn_multiple_of, as Llama).",
    )
    max_seq_len: int = Field(
        1024, ge=8,
        description="Longest sequence: the rows of the learned position table (position: rope has no "
        "table; this is then only the limit checked at each forward and written for transformers).",
    )
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
        2, ge=0, description="bert only: token-type (segment) embeddings; type 0 unless given (0: none, "
        "as ModernBERT).",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on embeddings and on each residual branch's output."
    )
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities.")
    layer_norm_eps: float = Field(
        1e-5, gt=0.0, description="Epsilon of every LayerNorm/RMSNorm (GPT-2 1e-5, BERT 1e-12, Llama 1e-5)."
    )
    init_std: float = Field(0.02, gt=0.0, description="Std of the normal weight init (HF initializer_range).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output projection.")
    init_from: str | None = Field(
        None, description="Start training from these weights: a transformers GPT-2/BERT/Llama/ModernBERT "
        "directory (safetensors), e.g. one written by `pretrain export`. Shapes must match this config; "
        "the vocabulary may differ only by padding rows.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in the backward pass (less memory, ~1/3 more "
        "compute); training only.",
    )
    position: Literal["learned", "rope"] = Field(
        "learned",
        description="learned: a table of absolute position embeddings (GPT-2, BERT). rope: rotary "
        "embeddings applied to queries and keys (Llama, ModernBERT); no position parameters.",
    )
    rope_theta: float = Field(
        10_000.0, gt=0.0,
        description="rope only: base of the rotary frequencies (Llama 2 1e4, Llama 3 5e5; ModernBERT's "
        "global layers 1.6e5).",
    )
    local_rope_theta: float | None = Field(
        None, gt=0.0,
        description="rope with local attention only: the base for the local layers (ModernBERT 1e4; "
        "None: rope_theta).",
    )
    norm: Literal["layernorm", "rmsnorm"] = Field(
        "layernorm", description="layernorm (GPT-2, BERT, ModernBERT) or rmsnorm (Llama: no mean, no bias)."
    )
    norm_placement: Literal["pre", "post"] | None = Field(
        None,
        description="pre: x + f(norm(x)) with a final norm (GPT-2, Llama, ModernBERT); post: norm(x + "
        "f(x)) (BERT). None: the arch's textbook layout (gpt pre, bert post); gpt is always pre.",
    )
    mlp: Literal["gelu", "swiglu", "geglu"] = Field(
        "gelu",
        description="gelu: expand, GELU, project back (GPT-2 tanh-approximate, BERT exact). swiglu: "
        "silu(x·W_gate) * (x·W_up), projected back (Llama). geglu: the same with exact GELU (ModernBERT).",
    )
    ffn_multiple_of: int = Field(
        256, ge=1, description="swiglu/geglu with d_ff None: the default width is rounded up to this."
    )
    n_kv_heads: int | None = Field(
        None, ge=1,
        description="Key/value heads (grouped-query attention; 1: multi-query). Must divide n_head. "
        "None: n_head (every query head has its own keys and values).",
    )
    bias: bool = Field(
        True,
        description="Biases in the linear layers and LayerNorms (false: none, as Llama and ModernBERT; "
        "the masked-LM decoder keeps its output bias).",
    )
    local_attention_window: int | None = Field(
        None, ge=2,
        description="bert only: local layers let a token see only tokens at most this/2 positions away "
        "(ModernBERT 128). None: every layer is global.",
    )
    global_attention_every_n_layers: int = Field(
        1, ge=1,
        description="With local_attention_window: layers 0, n, 2n, ... attend globally, the others "
        "locally (ModernBERT 3).",
    )
    attention_kernel: Literal["sdpa", "flex"] = Field(
        "sdpa",
        description="How masked attention (document masks, local windows) runs. sdpa: a boolean mask "
        "per row, any device (the reference). flex: FlexAttention block masks, compiled, which skip "
        "fully masked tiles (for CUDA; needs attn_dropout 0). Unmasked attention is fused either way.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shapes_from_init_from(cls, data, info):
        """``init_from``: unset fields come from its config.json, a set one must agree (hf_fields.py).
        Only for a config being loaded (load_config): a recorded config is already resolved, and its
        init_from directory may be gone by the time the checkpoint is evaluated or exported."""
        if isinstance(data, dict) and data.get("init_from") and (info.context or {}).get("resolve_init_from"):
            from pipeline.hf_fields import fill_from_hf

            return fill_from_hf(data)
        return data

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_heads is not None and self.n_head % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_head ({self.n_head})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position rope needs an even head size; d_model/n_head is {self.head_dim}")
        return self

    @model_validator(mode="after")
    def _options_fit_the_arch(self) -> ModelConfig:
        if self.arch == "gpt" and self.norm_placement == "post":
            raise ValueError("norm_placement post is for bert; gpt blocks are pre-norm")
        if self.local_attention_window is not None and self.arch != "bert":
            raise ValueError("local_attention_window is for bert (ModernBERT-style encoders); gpt attends globally")
        local = self.local_attention_window is not None
        if local != (self.global_attention_every_n_layers > 1):
            raise ValueError("local_attention_window and global_attention_every_n_layers (≥ 2) go together: "
                             "set both for alternating local/global layers, or neither")
        if self.local_rope_theta is not None and not (local and self.position == "rope"):
            raise ValueError("local_rope_theta needs position rope and local_attention_window")
        if self.attention_kernel == "flex" and self.attn_dropout > 0:
            raise ValueError("attention_kernel flex has no attention dropout: set attn_dropout 0 or use sdpa")
        return self

    @property
    def ffn_dim(self) -> int:
        """Feed-forward width with the default applied (each branch's width for gated MLPs)."""
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        m = self.ffn_multiple_of
        return -(-(8 * self.d_model // 3) // m) * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads with the default applied."""
        return self.n_kv_heads or self.n_head

    @property
    def pre_norm(self) -> bool:
        """Whether blocks normalise their input (pre-norm) rather than their output."""
        return (self.norm_placement or ("pre" if self.arch == "gpt" else "post")) == "pre"

    def is_local_layer(self, i: int) -> bool:
        """Whether block ``i`` uses the local attention window (ModernBERT: all but every third)."""
        return self.local_attention_window is not None and i % self.global_attention_every_n_layers != 0

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding: vocab_size rounded up to pad_vocab_to_multiple_of."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is not set: resolve it from the tokenizer first")
        m = self.pad_vocab_to_multiple_of
        return -(-self.vocab_size // m) * m


class OptimConfig(Section):
    """AdamW and the learning-rate schedule (a pure function of the step: train/schedule.py)."""

    lr: float = Field(6e-4, gt=0.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final LR as a share of the peak.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warmup from lr/warmup_steps to lr.")
    schedule: Literal["cosine", "linear", "wsd"] = Field(
        "cosine",
        description="After warmup: cosine or linear decay to min_lr_ratio at train.max_steps; wsd "
        "(warmup-stable-decay): hold the peak, then decay linearly to min_lr_ratio over the last "
        "wsd_decay_fraction of train.max_steps.",
    )
    wsd_decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd only: share of train.max_steps spent in the final decay."
    )
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay on matrices (not on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam beta1, beta2.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm (0: no clipping).")
    on_resume_schedule_change: Literal["continue", "restart", "refuse"] = Field(
        "continue",
        description="When a resumed run's schedule (train.max_steps, warmup_steps, schedule, lr, min_lr_ratio, "
        "wsd_decay_fraction) differs from the checkpoint's. continue: keep the LR the checkpoint was at and "
        "decay from it over the remaining steps (no jump). restart: a new warmup from the checkpoint's LR "
        "to lr, then decay to the end. refuse: stop before any rank starts (exit 2). "
        "See docs/continued-pretraining.md.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each Adam beta must be in [0, 1), got {list(betas)}")
        return betas


class TrainConfig(Section):
    """The training run: batch geometry, length, DeepSpeed/ZeRO, guards and metrics."""

    seq_len: int = Field(128, ge=8, description="Tokens per training sample.")
    micro_batch_size_per_gpu: int = Field(8, ge=1, description="Samples per forward/backward on one rank.")
    global_batch_size: int = Field(
        16, ge=1, description="Samples per optimizer step, all ranks; gradient accumulation makes up the "
        "difference to micro_batch_size_per_gpu × world size. Keep it fixed across resumes.",
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps of the whole run; the LR schedule spans them.")
    stop_at_step: int | None = Field(
        None, ge=1, description="Stop after this step with a committed checkpoint, although the schedule "
        "runs to max_steps (fixed-length jobs on a time-limited allocation; None: run to max_steps).",
    )
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage (0: plain data parallel).")
    offload_optimizer: bool = Field(
        False, description="ZeRO ≥ 1: keep optimizer states and the step on the CPU (ZeRO-Offload). The "
        "optimizer then comes from DeepSpeed's config block: DeepSpeedCPUAdam on GPU machines (its C++ op "
        "must build), torch AdamW where there is no CUDA.",
    )
    offload_params: bool = Field(
        False, description="ZeRO-3 only: keep the parameter partitions on the CPU as well (ZeRO-Infinity, CPU)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16: fp32 master weights, bf16 autocast compute. fp16: DeepSpeed's fp16 "
        "with dynamic loss scaling (overflowing steps are skipped and counted; needs a GPU).",
    )
    compile: bool = Field(False, description="torch.compile the model through DeepSpeed's engine.compile().")
    seed: int = Field(1234, description="Initial weights, sample order and MLM masking derive from it.")
    nproc_per_node: int = Field(
        1, ge=1, description="Processes `pretrain train` starts itself when no launcher did."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, else gloo.")
    log_interval_steps: int = Field(10, ge=1, description="Metrics to W&B, metrics.jsonl and the console every N steps.")
    dist_timeout_s: int = Field(600, ge=10, description="Collective timeout before a rank gives up.")
    max_consecutive_skips: int = Field(
        20, ge=1, description="Stop (exit code 4, last committed checkpoint untouched) after this many "
        "optimizer steps in a row were skipped: non-finite loss or gradient, fp16 overflow, loss spike.",
    )
    spike_action: Literal["off", "log", "skip", "rollback"] = Field(
        "log", description="On a loss spike: log it; skip the update (the batch counts as seen); or roll "
        "back to the newest committed checkpoint and never train on the spiking batches (recorded as "
        "skipped_batches in trainer_state.json, so resumes stay exact).",
    )
    spike_window_steps: int = Field(
        50, ge=2, description="Loss spikes are judged against the last N applied steps (none before N are seen)."
    )
    spike_zscore: float = Field(
        6.0, gt=0.0, description="A step loss more than this many standard deviations above the window mean is a spike."
    )
    spike_skip_batches: int = Field(
        1, ge=1, description="rollback: global batches skipped from the spiking one on."
    )
    peak_tflops_per_device: float | None = Field(
        None, gt=0.0, description="Dense peak TFLOP/s of one device at the training precision, for MFU "
        "(None: looked up for known GPUs, e.g. 989 for an H100 in bf16; on CPU MFU is not reported).",
    )

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed < 2**63:  # numpy's SeedSequence needs ≥ 0, torch.manual_seed < 2**64
            raise ValueError(f"must be in [0, 2**63), got {seed}")
        return seed

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError("train.offload_optimizer needs train.zero_stage ≥ 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage = 3")
        if self.stop_at_step is not None and self.stop_at_step > self.max_steps:
            raise ValueError(f"train.stop_at_step ({self.stop_at_step}) is past train.max_steps ({self.max_steps})")
        return self


class CheckpointConfig(Section):
    """When checkpoints are written, which are kept, and how preemption saves one."""

    save_interval_steps: int | None = Field(
        50, ge=1, description="Save every N steps (None: only by save_interval_minutes, preemption and the end)."
    )
    save_interval_minutes: float | None = Field(
        None, gt=0.0, description="Also save when this many minutes passed since the last save (rank 0's clock)."
    )
    keep_last: int = Field(3, ge=1, description="Committed checkpoints kept; older ones are deleted.")
    keep_every_steps: int | None = Field(
        None, ge=1, description="Also keep, forever, every checkpoint whose step is a multiple of this."
    )
    preempt_grace_s: float = Field(
        60.0, gt=0.0, description="After SIGTERM or SIGUSR1: finish the step, save, commit and exit 0 within "
        "this many seconds, or exit 143 without a checkpoint. Keep it below the scheduler's notice "
        "(Slurm --signal lead, Kubernetes terminationGracePeriodSeconds).",
    )
    resume_from: int | None = Field(
        None, ge=0, description="Resume from the committed checkpoint of this step instead of the newest "
        "(e.g. when the newest is corrupt); newer checkpoints are moved to checkpoints/.aside/ first. "
        "Checkpoints this run writes afterwards carry the mark, so a restart with the same setting "
        "continues from them instead of rewinding again (None: the newest).",
    )


class EvalConfig(Section):
    max_samples: int | None = Field(256, ge=1, description="Validation samples scored (None: all).")
    micro_batch_size: int = Field(8, ge=1)
    hold_unevaluated: int = Field(
        3, ge=0, description="While an eval job holds the run's eval lease (`pretrain eval --watch`), "
        "checkpoint retention keeps up to this many committed checkpoints it would delete but that have "
        "no eval.json yet, so a slow eval job does not lose steps (0: retention ignores eval jobs).",
    )


class TrackingConfig(Section):
    project: str = "pretrain"
    group: str | None = Field(None, description="W&B group shared by train and eval (None: run name).")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline."
    )


class RayLaunchConfig(Section):
    """`pretrain submit --to ray`: the Ray Jobs API of a running cluster."""

    address: str | None = Field(
        None, description="Jobs API address, e.g. http://head:8265 (None: RAY_ADDRESS, or --address)."
    )
    code: Literal["working_dir", "shared"] = Field(
        "working_dir",
        description="working_dir: upload pipeline/ + configs/ + the resolved config with the job (the "
        "cluster's image provides the Python packages). shared: the cluster sees this checkout at the "
        "same path (NFS, docker/compose.yaml); nothing is uploaded.",
    )
    python: str | None = Field(
        None, description="Python executable on the cluster (with this package's dependencies); None: launch.python."
    )


class SlurmLaunchConfig(Section):
    """`pretrain submit --to slurm`: an sbatch script rendered from a template in launch/slurm/."""

    template: str = Field("launch/slurm/train.sbatch", description="sbatch template, relative to the project root.")
    partition: str | None = Field(None, description="#SBATCH --partition (None: the cluster's default).")
    account: str | None = Field(None, description="#SBATCH --account (None: your default account).")
    time_limit: str = Field("24:00:00", pattern=r"^[0-9:-]+$", description="#SBATCH --time, e.g. 2-00:00:00.")
    cpus_per_task: int = Field(8, ge=1, description="CPUs per node for the launcher and its ranks.")
    signal_lead_s: int = Field(
        120, ge=10, description="Slurm sends USR1 this long before the time limit; the job then requeues."
    )
    python: str | None = Field(None, description="Python executable on the compute nodes; None: launch.python.")


class K8sLaunchConfig(Section):
    """`pretrain submit --to k8s`: a KubeRay RayJob (RayCronJob or CronJob with --schedule)."""

    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field("pretrain-pipeline:cuda", description="Cluster image built from docker/Dockerfile.cuda.")
    ray_version: str = Field("2.60.0", description="Ray version inside the image (KubeRay's rayVersion).")
    storage_claim: str | None = Field(
        None, description="PersistentVolumeClaim mounted at mount_path on every pod (run_dir and data live there)."
    )
    mount_path: str = Field("/mnt/shared", description="Where storage_claim is mounted.")
    cpus_per_node: int = Field(8, ge=1, description="CPU request of each Ray pod.")
    memory_per_node: str = Field("64Gi", description="Memory request and limit of each Ray pod.")
    schedule_kind: Literal["RayCronJob", "CronJob"] = Field(
        "RayCronJob",
        description="--schedule renders a KubeRay RayCronJob (needs the operator's RayCronJob feature "
        "gate), or a batch/v1 CronJob whose pod runs `pretrain submit --to ray --wait` against "
        "launch.ray.address (a standing RayCluster).",
    )


class LaunchConfig(Section):
    """Cluster submission (`pretrain submit`) and the run-directory lock of `pretrain train`."""

    nodes: int = Field(1, ge=1, description="Nodes of a cluster job (--nodes overrides).")
    gpus_per_node: int = Field(
        0, ge=0, description="GPUs per node (--gpus-per-node overrides); 0: CPU nodes running "
        "train.nproc_per_node ranks each.",
    )
    rdzv_port: int = Field(29500, ge=1024, le=65535, description="torchrun rendezvous port on the first node.")
    python: str | None = Field(
        None, description="Python executable a Slurm or Ray job runs (launch.slurm.python / launch.ray.python "
        "override it); None: the interpreter running `pretrain submit` (sys.executable). Kubernetes pods "
        "run the image's `python` unless this is set.",
    )
    max_restarts: int = Field(
        0, ge=0, description="When a rank or a node's ranks die, restart the whole group this many times "
        "before the job fails (torchrun --max-restarts under Slurm and our own torchrun, Ray Train "
        "FailureConfig.max_failures under Ray); each restart resumes from the last committed checkpoint "
        "and logs launch/restart. 0: a dead rank fails the job at once, which is what you want while a "
        "failure is more likely a bug than a flaky node; 2-3 on a cluster.",
    )
    lock_lease_s: float = Field(
        120.0, gt=0, description="A run-directory lock not renewed for this long is taken over."
    )
    lock_heartbeat_s: float = Field(
        20.0, gt=0, description="How often the holder renews its lease; at most half of lock_lease_s."
    )
    lock: bool = Field(
        True, description="Take the run-directory lock. false only where something else keeps two trainers "
        "apart (an object store without conditional writes refuses to start otherwise).",
    )
    ray: RayLaunchConfig = Field(default_factory=RayLaunchConfig)
    slurm: SlurmLaunchConfig = Field(default_factory=SlurmLaunchConfig)
    k8s: K8sLaunchConfig = Field(default_factory=K8sLaunchConfig)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> LaunchConfig:
        if self.lock_heartbeat_s * 2 > self.lock_lease_s:
            raise ValueError(
                f"launch.lock_heartbeat_s ({self.lock_heartbeat_s}) must be at most half of "
                f"launch.lock_lease_s ({self.lock_lease_s}), so one missed renewal does not lose the lease"
            )
        return self

    def ranks_per_node(self, train: TrainConfig) -> int:
        """One rank per GPU; on CPU nodes train.nproc_per_node."""
        return self.gpus_per_node or train.nproc_per_node


class StorageConfig(Section):
    """Object storage (run_dir / data paths given as s3://, gs://, az:// URIs). Endpoint and credentials
    come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from here."""

    cache_dir: str | None = Field(
        None, description="Node-local cache for staged shards and run mirrors; None: $PRETRAIN_CACHE_DIR, "
        "else ~/.cache/pretrain.",
    )
    workers: int = Field(16, ge=1, le=256, description="Parallel object-store transfers per node.")


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
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("run_dir")
    @classmethod
    def _run_dir_not_blank(cls, path: str) -> str:
        return _directory(path)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.model.arch == "bert" and self.data.tokenizer.type != "wordpiece" and not self.data.tokenizer.path:
            raise ValueError(
                "model.arch is bert but data.tokenizer.type is bpe: BERT needs [CLS]/[SEP]/[MASK]; "
                "set data.tokenizer.type: wordpiece"
            )
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        if self.train.global_batch_size % self.train.micro_batch_size_per_gpu:
            g, m = self.train.global_batch_size, self.train.micro_batch_size_per_gpu
            micros = sorted((d for d in range(1, g + 1) if g % d == 0), key=lambda d: (abs(d - m), -d))[:2]
            batches = sorted({b for b in ((g // m) * m, (g // m + 1) * m) if b > 0})
            raise ValueError(
                f"train.global_batch_size ({g}) must be a multiple of train.micro_batch_size_per_gpu ({m}); "
                f"nearest valid: micro_batch_size_per_gpu {' or '.join(map(str, sorted(micros)))}, or "
                f"global_batch_size {' or '.join(map(str, batches))}"
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


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}: key {dup.key!r} is given twice (lines {dup.first} and {dup.second}); "
                          f"keep one (YAML would silently use the last)") from None
    except yaml.YAMLError as exc:  # one line, and no echo of the file's text
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def preset_files() -> dict[str, Path]:
    """Name → file of every bundled preset: ``gpt2-tiny`` is ``configs/models/gpt2-tiny.yaml``."""
    return {p.stem: p for p in sorted(PRESETS_DIR.rglob("*.yaml"))}


def find_preset(name: str, where: str = "base") -> Path:
    """The file of preset ``name``; a ConfigError with the nearest names when there is none."""
    import difflib

    files = preset_files()
    if name in files:
        return files[name]
    close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`pretrain presets` lists them"
    raise ConfigError(f"{where}: no bundled preset named {name!r} ({hint})")


def _base_path(including: Path, base: str) -> Path:
    """Where a ``base:`` entry points: a bundled preset by name (``gpt2-tiny``), else a path relative
    to the including file, else one relative to the bundled presets (``models/gpt2-tiny.yaml``)."""
    if "/" not in base and not base.endswith((".yaml", ".yml")):
        return find_preset(base, f"{including}: base").resolve()
    beside = (including.parent / base).resolve()
    if beside.exists() or Path(base).is_absolute():
        return beside
    bundled = (PRESETS_DIR / base).resolve()
    return bundled if bundled.is_file() else beside


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), roots: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base` includes itself (cycle through {[str(p) for p in seen]})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _parse_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", []) or []
    if isinstance(bases, str):
        bases = [bases]
    roots = roots or (path.parent, PRESETS_DIR.resolve())
    merged: dict = {}
    for base in bases:
        base_path = _base_path(path, str(base))
        if not any(base_path.is_relative_to(r) for r in roots):
            raise ConfigError(
                f"{path}: base {str(base)!r} resolves to {base_path}, outside the config's folder {roots[0]} "
                f"and the bundled presets {roots[1]}; copy the file into one of them"
            )
        merged = _deep_merge(merged, _read_yaml(base_path, seen + (path,), roots))
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


def _known_keys(loc: tuple) -> list[str]:
    """The field names of the section at ``loc`` (a validation error's location, minus its last part)."""
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        candidates += [a for c in candidates for a in typing.get_args(c)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _unknown_key_message(loc: tuple) -> str:
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    hint = f"did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close else "check the spelling"
    return f"unknown key ({hint})"


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(tuple(err["loc"]))
        got = err.get("input")
        shown = "" if err["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{field}: {msg}{shown}")
    return f"invalid config {origin}: " + "; ".join(lines)


def build_config(raw: dict, origin: str = "", resolve_init_from: bool = False) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw, context={"resolve_init_from": resolve_init_from})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None


def _fetched(path: str | os.PathLike) -> Path:
    """A config given as an object-store URI (a job's submitted config on a cluster that shares no
    filesystem) is read from there into this node's cache; a path is itself."""
    from pipeline.objstore import cache_root, is_uri
    from pipeline.storage import open_storage

    if not is_uri(path):
        return Path(path)
    head, _, name = str(path).rstrip("/").rpartition("/")
    local = cache_root() / "configs" / hashlib.sha256(str(path).encode()).hexdigest()[:16] / name
    local.parent.mkdir(parents=True, exist_ok=True)
    open_storage(local.parent).write_atomic(name, open_storage(head).read_bytes(name))
    return local


def _export_cache_dir(cfg: PipelineConfig) -> PipelineConfig:
    """``storage.cache_dir`` reaches every process of the run (ranks, workers) through the environment."""
    if cfg.storage.cache_dir:
        from pipeline.objstore import CACHE_ENV

        os.environ[CACHE_ENV] = str(Path(cfg.storage.cache_dir).expanduser().absolute())
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (None: all defaults), apply overrides, validate once."""
    raw: dict[str, Any] = _read_yaml(_fetched(path)) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return _export_cache_dir(build_config(raw, origin=f"({path})" if path else "(defaults)", resolve_init_from=True))


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
