"""`pretrain plan`: check what can be checked before GPUs are allocated, and estimate the run.

Two halves. `estimate` is a pure function of the config (no torch, no files): parameters, FLOPs per
token, per-GPU memory for the ZeRO stage and precision, tokens to train and time at a given MFU.
`preflight` reads the disk: batch divisibility for the world size, the data manifest, and the
newest committed checkpoint's compatibility with this config.

Memory model, in bytes per parameter Ψ (ZeRO paper, Rajbhandari et al. 2020, section 3) as this
project's engine sets DeepSpeed up (train/engine.py):

  precision   weights  grads  optimizer (Adam m, v + fp32 master copy)
  fp32          4        4      8 (+4 master under ZeRO ≥ 1: DeepSpeed keeps an fp32 partition)
  bf16          4        4      8 (+4 master under ZeRO ≥ 1)   torch autocast: fp32 weights, bf16 math
  fp16          2        2      8 + 4 master                   DeepSpeed fp16 with loss scaling

ZeRO-1 divides the optimizer states by the world size, ZeRO-2 the gradients too, ZeRO-3 the weights
too. Activations per layer and micro-batch sample follow Korthikanti et al. 2022 (table 2) for a
fused attention kernel (no T² scores kept): element size e × T × (9·d + 2·d_ff), plus dropout masks,
plus the fp32 logits and log-softmax of the loss. With activation checkpointing only each block's
input is kept, and one block's activations are live while it is recomputed. The peak is the larger of
the end of the forward pass (states + activations + logits) and the optimizer step (states + the
step's flat fp32 gradient partition). Not modelled: the CUDA context and allocator fragmentation
(`OVERHEAD_BYTES`, reported apart), DeepSpeed's communication buckets, and temporary buffers of
individual kernels. benchmarks/plan_memory.py compares it with a measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, ModelConfig, PipelineConfig, TrainConfig
from pipeline.models.flops import param_count, train_flops_per_token
from pipeline.plan_advice import (
    RECOMPUTE_FACTOR, batch_suggestions, epochs_per_source, global_batch_suggestions, measured_tokens_per_s,
)
from pipeline.rundir import DatasetDir, RunDir
from pipeline.units import format_duration

if TYPE_CHECKING:  # the data and train layers are imported where the disk is read, not at import
    from pipeline.data.manifest import Manifest

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB  # CUDA context, cuBLAS/NCCL workspaces: reported, not added
MLM_PREDICTED_SHARE = 0.15  # BERT computes logits at the masked positions only
_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU at the peak of a training step."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    step_buffers: int  # live only in the optimizer step, when the activations are already freed

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """The larger of the two peaks: end of the forward pass, or the optimizer step."""
        return self.model_states + max(self.activations + self.logits, self.step_buffers)


@dataclass(frozen=True)
class Estimate:
    world_size: int
    params: int
    params_non_embedding: int
    flops_per_token: int
    gradient_accumulation_steps: int
    tokens_per_step: int
    tokens_total: int
    memory: MemoryEstimate
    seconds: float  # wall time for train.max_steps at the given MFU
    mfu: float
    peak_tflops: float


def state_bytes_per_param(precision: str, zero_stage: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter before ZeRO partitioning."""
    if precision not in _ELEMENT_BYTES:
        raise ValueError(f"precision must be one of {sorted(_ELEMENT_BYTES)}, got {precision!r}")
    if not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if precision == "fp16":
        return 2, 2, 8 + 4
    master = 4 if zero_stage >= 1 else 0  # stage 0: torch's AdamW updates the fp32 weights in place
    return 4, 4, 8 + master


def _saved_per_token(model: ModelConfig, precision: str, masked: bool) -> int:
    """Bytes one block keeps per token for its backward pass (Korthikanti et al. 2022 for GPT-2's
    block, and what autograd keeps for each alternative part, measured in tests/unit/test_plan_options.py)."""
    e = _ELEMENT_BYTES[precision]
    d, f, kv = model.d_model, model.ffn_dim, model.kv_heads * model.head_dim
    # norm inputs (2), norm outputs (2), q, attention output, residual input → 7·d; keys and values:
    # 2·kv_heads·head_dim, but a tensor mask makes attend() repeat them for every query head
    n = e * (7 * d + (2 * d if masked and kv < d else 2 * kv))
    if model.norm == "rmsnorm":  # the fp32 copy of each input and its fp32 normalised value
        n += 2 * ((4 - e) * d + 4 * d)
    # GELU: its input and output (2·d_ff); gated: the fused [gate; up] output (2·d_ff, alive through
    # the chunk views), act(gate) and the product (4·d_ff)
    n += e * (2 if model.mlp == "gelu" else 4) * f
    if model.dropout > 0:
        n += 2 * d  # two residual dropout masks, one byte per element
    return n


def _masked_layers(model: ModelConfig, document_masking: bool) -> tuple[int, int]:
    """(layers attending through a tensor mask, distinct masks built per forward): with the sdpa
    kernel, every layer under document masking, else the local-window layers only."""
    if model.attention_kernel != "sdpa":
        return 0, 0  # FlexAttention block masks: a few bytes per 128×128 tile
    local = sum(model.is_local_layer(i) for i in range(model.n_layer))
    if document_masking:
        return model.n_layer, 1 + (local > 0)
    return local, int(local > 0)


def mask_bytes(model: ModelConfig, seq_len: int, micro_batch: int, precision: str, document_masking: bool,
               layers: int | None = None) -> int:
    """Attention masks kept for the backward pass: per kind of layer (global, local) the boolean
    mask, (B, 1, T, T) with documents and (1, 1, T, T) for a local window alone, and per masked layer
    the additive copy in the compute dtype that SDPA makes of it and keeps."""
    masked, kinds = _masked_layers(model, document_masking)
    rows = micro_batch if document_masking else 1
    per_mask = rows * seq_len * seq_len
    return kinds * per_mask + min(masked, masked if layers is None else layers) * per_mask * _ELEMENT_BYTES[precision]


def activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, precision: str,
                     document_masking: bool = False) -> int:
    """Activations kept for the backward pass of one micro-batch (all blocks, or block inputs only)."""
    e = _ELEMENT_BYTES[precision]
    d, L = model.d_model, model.n_layer
    tokens = seq_len * micro_batch
    masked = _masked_layers(model, document_masking)[0] > 0
    per_block = tokens * _saved_per_token(model, precision, masked)
    residual = tokens * d * max(e, 4 if precision == "bf16" else e)  # autocast keeps the residual in fp32
    if model.activation_checkpointing:  # block inputs, plus one block recomputed at a time
        return L * residual + per_block + mask_bytes(model, seq_len, micro_batch, precision, document_masking, 1)
    return L * per_block + residual + mask_bytes(model, seq_len, micro_batch, precision, document_masking)


def logits_bytes(model: ModelConfig, seq_len: int, micro_batch: int, precision: str) -> int:
    """The loss: logits in the compute dtype, an fp32 copy and its fp32 log-softmax."""
    positions = seq_len * micro_batch
    if model.arch == "bert":
        positions = max(1, round(positions * MLM_PREDICTED_SHARE))
    return positions * model.padded_vocab_size * (_ELEMENT_BYTES[precision] + 8)


def model_state_bytes(n_params: int, precision: str, zero_stage: int, world_size: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes on one rank after ZeRO partitioning."""
    w, g, o = state_bytes_per_param(precision, zero_stage)
    return (n_params * w // (world_size if zero_stage >= 3 else 1),
            n_params * g // (world_size if zero_stage >= 2 else 1),
            n_params * o // (world_size if zero_stage >= 1 else 1))


def step_buffer_bytes(n_params: int, precision: str, zero_stage: int, world_size: int) -> int:
    """Buffers of the optimizer step: DeepSpeed converts the gradients of the fp32 master partition
    (ZeRO ≥ 1, or fp16's master copy) into one flat fp32 tensor. torch's fused AdamW (GPU) needs no
    more; the unfused one on CPU allocates about one more fp32 tensor per parameter."""
    if zero_stage >= 1:
        return n_params * 4 // world_size
    return n_params * 4 if precision == "fp16" else 0


def memory_per_gpu(model: ModelConfig, train: TrainConfig, world_size: int,
                   document_masking: bool = False) -> MemoryEstimate:
    n = param_count(model)
    weights, gradients, optimizer = model_state_bytes(n, train.precision, train.zero_stage, world_size)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activation_bytes(model, train.seq_len, train.micro_batch_size_per_gpu, train.precision,
                                     document_masking),
        logits=logits_bytes(model, train.seq_len, train.micro_batch_size_per_gpu, train.precision),
        step_buffers=step_buffer_bytes(n, train.precision, train.zero_stage, world_size),
    )


def estimate(cfg: PipelineConfig, world_size: int, mfu: float = 0.4, peak_tflops: float = 989.0) -> Estimate:
    """Everything `pretrain plan` prints, from the config alone. ``model.vocab_size`` must be set."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
    model, train = cfg.model, cfg.train
    accum = cfg.gradient_accumulation_steps(world_size)
    flops_per_token = train_flops_per_token(model, train.seq_len)
    tokens_per_step = train.global_batch_size * train.seq_len
    tokens_total = train.max_steps * tokens_per_step
    seconds = tokens_total * flops_per_token / (world_size * peak_tflops * 1e12 * mfu)
    if model.activation_checkpointing:  # each block's forward runs twice
        seconds *= RECOMPUTE_FACTOR
    return Estimate(
        world_size=world_size,
        params=param_count(model),
        params_non_embedding=param_count(model, include_position=False, include_embedding=False),
        flops_per_token=flops_per_token,
        gradient_accumulation_steps=accum,
        tokens_per_step=tokens_per_step,
        tokens_total=tokens_total,
        memory=memory_per_gpu(model, train, world_size, cfg.data.document_masking),
        seconds=seconds,
        mfu=mfu,
        peak_tflops=peak_tflops,
    )


# ---------------------------------------------------------------- pre-flight checks (read the disk)


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str
    blocking: bool = True  # False: a warning that does not fail the plan


def _check_data(cfg: PipelineConfig, checks: list[Check]) -> Manifest | None:
    from pipeline.data.manifest import ManifestError, verify_manifest

    root = cfg.data.output_dir
    try:
        manifest = verify_manifest(root)
    except ManifestError as exc:
        checks.append(Check("data", False, str(exc)))
        return None
    train = manifest.splits.get("train")
    train_tokens = train.tokens if train is not None else 0
    checks.append(Check("data", True, f"{DatasetDir(root).manifest} verified ({train_tokens:,} train tokens)"))
    if train_tokens < cfg.train.seq_len + 1:
        checks.append(Check("data", False, f"the train split has {train_tokens} tokens, fewer than one "
                            f"sample of train.seq_len + 1 = {cfg.train.seq_len + 1}"))
    from pipeline.train.compat import dataset_config_problems, describe_dataset_problems, source_differences

    problems = dataset_config_problems(cfg, manifest)  # the rule `pretrain train` refuses by
    if problems:
        checks.append(Check("data", False, describe_dataset_problems(cfg, problems)))
    sources = source_differences(cfg, manifest)
    if sources:
        checks.append(Check("data", False, sources, blocking=False))
    return manifest


def _check_checkpoint(cfg: PipelineConfig, manifest: Manifest | None, checks: list[Check]) -> None:
    """The newest committed checkpoint against this config and dataset, by the one resume rule
    (train/compat.py) that `pretrain train` applies before any rank starts."""
    from pipeline.data.manifest import manifest_sha256
    from pipeline.train.checkpoint import CheckpointError, latest_committed
    from pipeline.train.compat import resume_problems

    root = RunDir(cfg.run_dir).checkpoints
    try:
        newest = latest_committed(root, verify=True)
        state = newest.state() if newest is not None else None
    except CheckpointError as exc:
        checks.append(Check("checkpoint", False, str(exc)))
        return
    if newest is None:
        checks.append(Check("checkpoint", True, f"none under {root}: training starts at step 0"))
        return
    sha = manifest_sha256(cfg.data.output_dir) if manifest is not None else None
    problems = resume_problems(cfg, state, manifest, sha)
    if problems:
        checks.append(Check("checkpoint", False, f"{newest.path} cannot be resumed with this config: "
                            + "; ".join(problems) + ". Use a new run_dir or the original config"))
        return
    _check_schedule(cfg, state, checks)
    era = (" on a dataset grown by `prepare --append` since (a new data era starts there)"
           if sha is not None and state.data_manifest_sha256 != sha else "")
    budget = (f"; train.max_steps ({cfg.train.max_steps}) is reached: `pretrain train` will do nothing"
              if state.step >= cfg.train.max_steps else f", {cfg.train.max_steps - state.step} steps to go")
    checks.append(Check("checkpoint", True, f"resumes from {newest.path} at step {state.step} (trained on world "
                        f"size {state.world_size}){era}{budget}"))


def _check_schedule(cfg: PipelineConfig, state, checks: list[Check]) -> None:
    """A resumed run whose LR schedule differs from the checkpoint's: refused, or said."""
    from pipeline.train.compat import schedule_problem
    from pipeline.train.schedule import describe_change, resumed

    refusal = schedule_problem(cfg, state)
    if refusal:
        checks.append(Check("schedule", False, refusal))
        return
    schedule, changed = resumed(state.lr_schedule, cfg.optim, cfg.train.max_steps, state.step)
    if changed:
        checks.append(Check("schedule", False, describe_change(schedule, changed), blocking=False))


def _check_disk(cfg: PipelineConfig, checks: list[Check]) -> None:
    """Warn when checkpoint.keep_last checkpoints (plus the one being written) exceed the free space."""
    import shutil
    from pathlib import Path

    from pipeline.train.checkpoint import checkpoint_bytes

    if cfg.model.vocab_size is None:
        return
    one = checkpoint_bytes(RunDir(cfg.run_dir).checkpoints, param_count(cfg.model), cfg.train.precision)
    where = next((p for p in (Path(cfg.run_dir), *Path(cfg.run_dir).absolute().parents) if p.is_dir()), None)
    if one is None or where is None:
        return
    free = shutil.disk_usage(where).free + _checkpoint_bytes_there(cfg)
    keep = cfg.checkpoint.keep_last + 1  # retention deletes the oldest only after the new one is committed
    need = one * keep
    ok = need <= free
    checks.append(Check("disk", ok, f"{keep} checkpoints of ~{one / 1e6:,.0f} MB (checkpoint.keep_last "
                        f"{cfg.checkpoint.keep_last} + the one being written) {'fit in' if ok else 'exceed'} the "
                        f"{free / 1e6:,.0f} MB free at {where}" + ("" if ok else "; free space or lower "
                        "checkpoint.keep_last, or a save will fail with `no space left on device`"), blocking=False))


def _checkpoint_bytes_there(cfg: PipelineConfig) -> int:
    """Bytes the run's committed checkpoints already take (retention frees them for new ones)."""
    from pipeline.train.checkpoint import committed_checkpoints

    total = 0
    for c in committed_checkpoints(RunDir(cfg.run_dir).checkpoints):
        store = c.storage
        total += sum(store.size(k) for k in store.list())
    return total


def _resolve_vocab(cfg: PipelineConfig, manifest: Manifest | None, checks: list[Check]) -> PipelineConfig:
    """The config with ``model.vocab_size`` from the prepared tokenizer where the model does not set it."""
    from pipeline.train.compat import resolve_model_config

    vocab = manifest.tokenizer.vocab_size if manifest is not None else None
    if vocab is not None:
        try:
            cfg = cfg.model_copy(update={"model": resolve_model_config(cfg.model, vocab)})
        except ConfigError as exc:
            checks.append(Check("model", False, str(exc)))
    if cfg.model.vocab_size is None and vocab is None:
        target, where = _configured_vocab(cfg)
        cfg = cfg.model_copy(update={"model": resolve_model_config(cfg.model, target)})
        checks.append(Check("model", True, f"vocabulary {target:,} from {where} (the data is not prepared yet)"))
    return cfg


def _configured_vocab(cfg: PipelineConfig) -> tuple[int, str]:
    """The vocabulary the tokenizer will have: data.tokenizer.path's, else data.tokenizer.vocab_size
    (a trained tokenizer comes out at most that large)."""
    tok = cfg.data.tokenizer
    if tok.path:
        from pipeline.data.tokenizer import TokenizerError, load_tokenizer

        try:
            return load_tokenizer(tok.path).get_vocab_size(), f"data.tokenizer.path ({tok.path})"
        except TokenizerError:
            pass
    return tok.vocab_size, "data.tokenizer.vocab_size"


def preflight(cfg: PipelineConfig, world_size: int) -> tuple[PipelineConfig, list[Check]]:
    """Check the batch split, the data and the checkpoint; returns the config with the vocabulary
    resolved from the prepared tokenizer where the model does not set it."""
    checks: list[Check] = []
    try:
        accum = cfg.gradient_accumulation_steps(world_size)
        checks.append(Check("batch", True, f"{cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size_per_gpu}"
                            f" × accumulation {accum} × world size {world_size}"))
    except ConfigError as exc:
        checks.append(Check("batch", False, f"{exc}; {_batch_advice(cfg, world_size)}"))
    manifest = _check_data(cfg, checks)
    cfg = _resolve_vocab(cfg, manifest, checks)
    _check_checkpoint(cfg, manifest, checks)
    _check_disk(cfg, checks)
    return cfg, checks


def _manifest_or_none(cfg: PipelineConfig) -> Manifest | None:
    from pipeline.data.manifest import ManifestError, read_manifest

    try:
        return read_manifest(cfg.data.output_dir)
    except ManifestError:
        return None


def _batch_advice(cfg: PipelineConfig, world: int) -> str:
    t = cfg.train
    pairs = batch_suggestions(t.global_batch_size, t.micro_batch_size_per_gpu, world)
    if pairs:
        return "valid (micro-batch, accumulation) pairs nearest to yours: " + ", ".join(
            f"train.micro_batch_size_per_gpu={m} (accumulation {a})" for m, a in pairs)
    sizes = global_batch_suggestions(t.global_batch_size, t.micro_batch_size_per_gpu, world)
    return "no micro-batch divides it on this world size; nearest global batch sizes: " + ", ".join(
        f"train.global_batch_size={b}" for b in sizes)


def for_estimate(cfg: PipelineConfig, world: int) -> tuple[PipelineConfig, str]:
    """The config the estimate is made for: as it is, or, when its batch split does not divide, with
    the nearest valid micro-batch (and a note saying so)."""
    try:
        cfg.gradient_accumulation_steps(world)
        return cfg, ""
    except ConfigError:
        pairs = batch_suggestions(cfg.train.global_batch_size, cfg.train.micro_batch_size_per_gpu, world)
        if not pairs:
            return cfg, ""
        train = cfg.train.model_copy(update={"micro_batch_size_per_gpu": pairs[0][0]})
        return cfg.model_copy(update={"train": train}), (f"(the estimate below uses micro-batch {pairs[0][0]}, "
                                                         f"accumulation {pairs[0][1]}: the nearest valid split)")


def epochs_line(cfg: PipelineConfig, manifest: Manifest | None) -> str | None:
    """``epochs       web 0.42 passes (weight 3), books 3.70 passes (weight 1): repeats data``."""
    if manifest is None or "train" not in manifest.splits:
        return None
    tokens = {n: s.tokens for n, s in manifest.splits["train"].sources.items()}
    epochs = epochs_per_source(cfg, tokens)
    if not epochs:
        return None
    weights = {s.resolved_name: s.weight for s in cfg.data.sources}
    parts = [f"{n} {e:,.2f} passes (weight {weights.get(n, 1.0):g})" for n, e in epochs.items()]
    repeat = [n for n, e in epochs.items() if e > 1]
    tail = f": repeats {', '.join(repeat)}" if repeat else ""
    return "epochs       " + ", ".join(parts) + tail


def measured_line(cfg: PipelineConfig, est: Estimate) -> str | None:
    """A time estimate from this run's own logged throughput, when it has trained before."""
    from pipeline.eval.records import read_jsonl

    rate = measured_tokens_per_s(read_jsonl(RunDir(cfg.run_dir).metrics))
    if not rate:
        return None
    return (f"measured     {rate:,.0f} tokens/s logged by this run: {_duration(est.tokens_total / rate)} for "
            f"all {cfg.train.max_steps:,} steps at that rate")


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    return format_duration(seconds, "approx")


def format_report(cfg: PipelineConfig, est: Estimate) -> str:
    m, t = est.memory, cfg.train
    gpu_hours = est.seconds * est.world_size / 3600
    recompute = "on (≈1/3 more compute per step)" if cfg.model.activation_checkpointing else "off"
    lines = [
        f"model        {cfg.model.arch}, {cfg.model.n_layer} layers × d_model {cfg.model.d_model}, "
        f"vocab {cfg.model.padded_vocab_size}: {est.params / 1e6:,.1f}M parameters "
        f"({est.params_non_embedding / 1e6:,.1f}M non-embedding)",
        f"compute      {est.flops_per_token / 1e9:,.3f} GFLOPs per trained token (6·N + 12·L·d·T)",
        f"batch        world size {est.world_size}, micro-batch {t.micro_batch_size_per_gpu} × seq_len "
        f"{t.seq_len}, accumulation {est.gradient_accumulation_steps}, "
        f"{est.tokens_per_step:,} tokens per step",
        f"setup        ZeRO-{t.zero_stage}, {t.precision}, activation checkpointing {recompute}",
        "memory/GPU   " + ", ".join([
            f"weights {_gib(m.weights)}", f"gradients {_gib(m.gradients)}", f"optimizer {_gib(m.optimizer)}",
            f"activations {_gib(m.activations)}", f"logits {_gib(m.logits)}",
            f"optimizer-step buffers {_gib(m.step_buffers)}"]),
        f"             total ≈ {_gib(m.total)} (+ ≈{_gib(OVERHEAD_BYTES)} CUDA context and workspaces, "
        f"not included)",
        f"tokens       {t.max_steps:,} steps × {est.tokens_per_step:,} = {est.tokens_total:,} "
        f"({est.tokens_total / 1e9:,.3f} B)",
        f"time         {_duration(est.seconds)} at MFU {est.mfu:.0%} of {est.peak_tflops:.3g} TFLOPs per rank "
        f"({gpu_hours:,.1f} GPU-hours)",
    ]
    masks = mask_bytes(cfg.model, t.seq_len, t.micro_batch_size_per_gpu, t.precision, cfg.data.document_masking)
    if masks:
        lines.append(f"note         attention masks (sdpa) are {_gib(masks)} of the activations; "
                     f"model.attention_kernel flex keeps none")
    if t.precision == "fp32" and est.peak_tflops >= 300:
        lines.append(f"note         precision fp32: {est.peak_tflops:g} TFLOPs is a 16-bit tensor-core peak; "
                     f"pass --peak-tflops for fp32/TF32 (H100 SXM: 67 fp32, 494 TF32)")
    return "\n".join(lines)


def resolve_peak(cfg: PipelineConfig, peak_tflops: float | None) -> tuple[float, str]:
    """The peak TFLOP/s per rank to estimate with: given, else measured on this CPU for a CPU run
    (launch.gpus_per_node 0), else an H100's dense 16-bit peak."""
    if peak_tflops is not None:
        return peak_tflops, ""
    if cfg.launch.gpus_per_node == 0:
        from pipeline.plan_advice import cpu_peak_tflops

        ranks = cfg.train.nproc_per_node
        peak = cpu_peak_tflops() / ranks
        return peak, (f"note         a CPU run (launch.gpus_per_node 0): peak {peak * 1e3:,.1f} GFLOP/s per rank, "
                      f"measured here (fp32 matmul, this machine's cores shared by {ranks} rank(s))")
    return 989.0, ""


def run_plan(cfg: PipelineConfig, world_size: int, mfu: float, peak_tflops: float | None, out=print) -> int:
    """Print the checks and the estimate; 0 when nothing blocks the run, 1 otherwise."""
    cfg, checks = preflight(cfg, world_size)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.blocking else "warn")
        out(f"[{mark}] {c.what:<10} {c.detail}")
    est_cfg, note = for_estimate(cfg, world_size)
    if est_cfg.model.vocab_size is not None and (note or all(c.ok or c.what != "batch" for c in checks)):
        peak, peak_note = resolve_peak(cfg, peak_tflops)
        est = estimate(est_cfg, world_size, mfu, peak)
        out("")
        out("\n".join(line for line in (note, format_report(est_cfg, est), peak_note, measured_line(cfg, est),
                                          epochs_line(cfg, _manifest_or_none(cfg))) if line))
    failed = [c for c in checks if not c.ok and c.blocking]
    if failed:
        out(f"\nplan: {len(failed)} problem(s) above must be fixed before this run can start")
        return 1
    return 0
