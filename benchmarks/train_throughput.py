"""Training-step throughput: our model through our DeepSpeed engine vs HF transformers under
DeepSpeed ZeRO-2 + torch.compile, side by side in one run on one device.

    python benchmarks/train_throughput.py --preset gpt2-small --micro-batch 16 --seq-len 1024
    python benchmarks/train_throughput.py --preset gpt2-tiny --micro-batch 8 --seq-len 128   # CPU smoke

Both sides: random tokens, bf16 (torch autocast, fp32 master weights), AdamW, a real optimizer step
every iteration, warm-up (compilation) before timing, the median of the timed steps. MFU uses
(6·N + 12·L·d·T) FLOPs per token against --peak-tflops (H100 SXM dense bf16: 989). Numbers count
only from a GPU; the CPU run exists so this script keeps working in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.models.flops import train_flops_per_token  # noqa: E402
from pipeline.train.engine import deepspeed_config, resolve_model_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def init_single_process() -> None:
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29655")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def hf_model(cfg):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from pipeline.models.hf import hf_config

    hf = hf_config(cfg)
    if cfg.arch == "gpt":
        return GPT2LMHeadModel(GPT2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}))
    return BertForMaskedLM(BertConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}))


def time_steps(engine, forward, batches, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds per optimizer step, and peak memory in GiB (CUDA) or NaN (CPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = forward(x, y)
        engine.backward(loss)
        engine.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return statistics.median(times), peak


def run(args) -> list[dict]:
    import deepspeed

    preset = CONFIGS / "models" / f"{args.preset}.yaml"
    overrides = [f"train.micro_batch_size_per_gpu={args.micro_batch}", f"train.global_batch_size={args.micro_batch}",
                 f"train.seq_len={args.seq_len}", "train.precision=bf16", f"train.zero_stage={args.zero_stage}",
                 f"model.max_seq_len={max(args.seq_len, 8)}"]
    if "bert" in args.preset:
        overrides.append("data.tokenizer.type=wordpiece")
    cfg = load_config(preset, overrides)
    model_cfg = resolve_model_config(cfg.model, args.vocab)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=g)
        if model_cfg.arch == "gpt":
            y = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=g)
        else:  # 15% masked positions
            y = torch.full_like(x, -100)
            m = torch.rand(x.shape, generator=g) < 0.15
            y[m] = x[m]
        batches.append((x.to(device), y.to(device)))
    tokens_per_step = args.micro_batch * args.seq_len
    flops_per_token = train_flops_per_token(model_cfg, args.seq_len)
    rows = []
    for name in ("ours", "hf+deepspeed+compile"):
        torch.manual_seed(0)
        if name == "ours":
            model = build_model(model_cfg)
            compiled = torch.compile(model) if args.compile_ours else model
        else:
            model = hf_model(model_cfg)
            compiled = torch.compile(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.cuda.is_available())
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1))
        if name == "ours":
            forward = lambda x, y, m=compiled: m(x, y)  # noqa: E731
        elif model_cfg.arch == "gpt":
            # HF shifts labels itself: give it the unshifted sequence
            forward = lambda x, y, m=compiled: m(input_ids=x, labels=x).loss  # noqa: E731
        else:
            forward = lambda x, y, m=compiled: m(input_ids=x, labels=y).loss  # noqa: E731
        seconds, peak = time_steps(engine, forward, batches, args.warmup, args.steps)
        tps = tokens_per_step / seconds
        rows.append({
            "impl": name, "tokens_per_s": tps, "samples_per_s": args.micro_batch / seconds,
            "mfu": tps * flops_per_token / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan"),
            "peak_gib": peak,
        })
        del engine, model, compiled, optimizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-tiny")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0 if torch.cuda.is_available() else 0.0)
    p.add_argument("--no-compile-ours", dest="compile_ours", action="store_false")
    args = p.parse_args()
    init_single_process()
    rows = run(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.preset}, micro-batch {args.micro_batch}, seq {args.seq_len}, bf16, ZeRO-{args.zero_stage}, {device}")
    print(f"{'implementation':<24}{'tokens/s':>12}{'samples/s':>11}{'MFU':>8}{'peak GiB':>10}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] == r["mfu"] else "—"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] == r["peak_gib"] else "—"
        print(f"{r['impl']:<24}{r['tokens_per_s']:>12,.0f}{r['samples_per_s']:>11,.1f}{mfu:>8}{peak:>10}")
    print(f"ratio ours / baseline: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}×")


if __name__ == "__main__":
    main()
