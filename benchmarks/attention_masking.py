"""Document-masked attention vs plain causal attention: one training step (forward + backward) at
the same shape, side by side in one run.

    python benchmarks/attention_masking.py                      # CPU: llama-tiny's shape, sdpa masks
    python benchmarks/attention_masking.py --device cuda --batch 8 --seq-lens 1024 2048 4096 --flex

Rows per sequence length: ``causal`` (no doc_ids: SDPA's fused causal kernel, what the GPT-2
presets run), ``documents, sdpa`` (doc_ids: a (B, 1, T, T) boolean mask built per step and SDPA with
it, the CPU path and the reference) and, with ``--flex``, ``documents, flex`` (FlexAttention block
masks, compiled; what ``model.attention_kernel: flex`` runs on CUDA; FlexAttention has no backward
pass on CPU). Two timings each: the whole model (llama-tiny's blocks by default: RoPE, RMSNorm,
SwiGLU, 4 query heads sharing 2 key/value heads; loss and backward, no optimizer step) and one
attention layer alone (forward + backward, mask building included). Packed documents have lengths
drawn from a seeded exponential distribution (mean ``--mean-doc-tokens``), the same for every row
kind. Each number is the fastest of ``--steps`` timed steps (``--stat median`` for the median)
after ``--warmup`` untimed ones, the row kinds timed in turns, so that other work on a shared
machine disturbs every row alike and the least disturbed step counts; ``--clock cpu`` times this
process's CPU seconds instead of wall seconds (with ``--threads 1`` on a shared CPU machine, what
other processes do then hardly shows).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.models.attention_masks import build_mask, positions  # noqa: E402
from pipeline.models.layers import RotaryEmbedding  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "models"


def packed_doc_ids(batch: int, seq_len: int, mean: float, seed: int = 0) -> torch.Tensor:
    """(B, T) document ids: each row is a run of documents with exponential lengths (≥ 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(max(1, int(torch.empty(1).exponential_(1 / mean, generator=g).item())))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq_len])
    return torch.stack(rows)


def interleaved_seconds(fns: list, warmup: int, steps: int, device: str, stat=min, clock=time.perf_counter) -> list[float]:
    """Seconds of each function (``stat`` of its timed calls), timed in turns: one call of each
    per round."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, out in zip(fns, times):
            sync()
            t0 = clock()
            fn()
            sync()
            out.append(clock() - t0)
    return [stat(t) for t in times]


def model_step(model, ids: torch.Tensor, doc_ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(ids, ids, doc_ids=doc_ids).backward()
    return step


def attention_step(model, x: torch.Tensor, doc_ids):
    """One attention layer: the mask and rotary angles for this batch, then forward + backward."""
    attn, cfg = model.blocks[0].attn, model.cfg
    rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.position == "rope" else None

    def step():
        T = x.shape[1]
        mask = build_mask(causal=True, seq_len=T, device=x.device, doc_ids=doc_ids, kernel=cfg.attention_kernel)
        rope = None if rotary is None else rotary(positions(doc_ids, T, x.device))
        attn.zero_grad(set_to_none=True)
        x.grad = None
        attn(x, mask, rope).sum().backward()
    return step


def run(args) -> list[dict]:
    torch.manual_seed(0)
    cfg = load_config(PRESETS / f"{args.preset}.yaml", [f"model.vocab_size={args.vocab}",
                                                        f"model.max_seq_len={max(args.seq_lens)}",
                                                        f"train.seq_len={max(args.seq_lens)}"]).model
    kinds = [("causal", "sdpa", False), ("documents, sdpa", "sdpa", True)]
    if args.flex:
        kinds.append(("documents, flex", "flex", True))
    rows = []
    for T in args.seq_lens:
        ids = torch.randint(0, args.vocab, (args.batch, T), device=args.device)
        docs = packed_doc_ids(args.batch, T, args.mean_doc_tokens).to(args.device)
        x = torch.randn(args.batch, T, cfg.d_model, device=args.device, requires_grad=True)
        steps, layers = [], []
        for _, kernel, masked in kinds:
            torch.manual_seed(0)
            model = build_model(cfg.model_copy(update={"attention_kernel": kernel})).to(args.device).train()
            steps.append(model_step(model, ids, docs if masked else None))
            layers.append(attention_step(model, x, docs if masked else None))
        stat = statistics.median if args.stat == "median" else min
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        step_s = interleaved_seconds(steps, args.warmup, args.steps, args.device, stat, clock)
        attn_s = interleaved_seconds(layers, args.warmup, args.steps, args.device, stat, clock)
        for (name, _, _), a, b in zip(kinds, step_s, attn_s):
            rows.append({"seq_len": T, "kind": name, "step_ms": a * 1e3, "attn_ms": b * 1e3, "step_x": a / step_s[0],
                         "attn_x": b / attn_s[0], "docs_per_row": float(docs.amax(dim=1).float().mean() + 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-tiny", help="configs/models/NAME.yaml (default: llama-tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--mean-doc-tokens", type=float, default=200.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--flex", action="store_true", help="add FlexAttention rows (compiled; CUDA only)")
    p.add_argument("--stat", choices=["min", "median"], default="min", help="of the timed steps (default: min)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (all its threads), steadier than wall time on a shared "
                   "CPU machine; meaningless on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; use the wall clock on --device cuda")
    if args.flex and args.device != "cuda":
        p.error(f"--flex needs --device cuda: FlexAttention has no backward pass on {args.device} (torch {torch.__version__})")
    rows = run(args)
    print(f"# {args.preset}, batch {args.batch}, vocab {args.vocab}, mean document {args.mean_doc_tokens:g} tokens, "
          f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {args.stat} of {args.steps} steps, {args.clock} clock")
    print("| seq_len | attention | docs/row | model fwd+bwd ms | × causal | attention layer fwd+bwd ms | × causal |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['kind']} | {r['docs_per_row']:.1f} | {r['step_ms']:.1f} | {r['step_x']:.2f} | "
              f"{r['attn_ms']:.2f} | {r['attn_x']:.2f} |")


if __name__ == "__main__":
    main()
