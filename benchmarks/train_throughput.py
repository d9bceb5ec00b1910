"""Training-step throughput on one device, in one process: ours (our model through our DeepSpeed
engine, as `pretrain train` sets it up) against (a) HF transformers `GPT2LMHeadModel` /
`BertForMaskedLM` under DeepSpeed ZeRO-2 + torch.compile and (b) a plain PyTorch loop the way a user
writes it by hand (nanoGPT-style model, torch.compile, SDPA, torch fused AdamW, autocast bf16).

    python benchmarks/train_throughput.py --workload gpt2-124m --out gpu-out/throughput-gpt2-124m.json
    python benchmarks/train_throughput.py --smoke --out /tmp/smoke.json      # tiny shapes, CPU, no compile

All three: the same shapes, random tokens, bf16 autocast over fp32 weights, AdamW, an optimizer step
every iteration, warm-up (compilation) before timing, the median of the timed steps. MFU is
(6·N + 12·L·d·T) FLOPs per token (N without position embeddings) × tokens/s ÷ --peak-tflops
(989.4, dense bf16 of an H100/H200). The plain loop's model is nanoGPT's GPT-2 for GPT-2 shapes; for
the Llama shape (RoPE, SwiGLU, GQA) it is our own module trained by the plain loop. Numbers count only
from a GPU; the CPU smoke run exists so the script keeps working in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.models.flops import param_count, train_flops_per_token  # noqa: E402
from pipeline.plan import memory_per_gpu  # noqa: E402
from pipeline.train import engine as our_engine  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PEAK_TFLOPS = 989.4
OURS, HF, PLAIN = "ours", "hf+deepspeed-zero2+compile", "plain-pytorch+compile"
FIELDS = ("workload", "impl", "preset", "seq_len", "micro_batch", "vocab", "params", "tokens_per_s",
          "samples_per_s", "step_ms", "mfu", "peak_gib", "plan_estimate_gib", "compiled", "device")


@dataclass(frozen=True)
class Workload:
    preset: str
    seq_len: int
    micro_batch: int
    vocab: int
    impls: tuple[str, ...]


WORKLOADS = {
    "gpt2-124m": Workload("gpt2-small", 1024, 16, 50257, (OURS, HF, PLAIN)),
    "gpt2-350m": Workload("gpt2-medium", 1024, 8, 50257, (OURS, HF, PLAIN)),
    "bert-base": Workload("bert-base", 128, 256, 30522, (OURS, HF)),
    "llama-1b": Workload("llama-1b", 2048, 4, 128256, (OURS, PLAIN)),
}
SMOKE = {
    "smoke-gpt2": Workload("gpt2-tiny", 64, 2, 512, (OURS, HF, PLAIN)),
    "smoke-bert": Workload("bert-tiny", 32, 4, 512, (OURS, HF)),
    "smoke-llama": Workload("llama-tiny", 64, 2, 512, (OURS, PLAIN)),
}


class NanoBlock(nn.Module):
    """nanoGPT's block: pre-LayerNorm, fused qkv, SDPA causal attention, GELU MLP."""

    def __init__(self, d: int, n_head: int, d_ff: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """The GPT-2 a user writes by hand (nanoGPT): learned positions, tied embeddings."""

    def __init__(self, m):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(m.vocab_size, m.d_model), nn.Embedding(m.max_seq_len, m.d_model)
        self.blocks = nn.ModuleList(NanoBlock(m.d_model, m.n_head, m.d_ff or 4 * m.d_model) for _ in range(m.n_layer))
        self.ln_f = nn.LayerNorm(m.d_model)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.view(-1), ignore_index=-100)


def init_single_process() -> None:
    """A one-rank process group, as `pretrain train`'s single-process route makes it."""
    from pipeline.launch.local import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    our_engine.init_distributed(load_config(None, []))


def pipeline_config(w: Workload, compile_: bool, zero_stage: int):
    overrides = [f"train.micro_batch_size_per_gpu={w.micro_batch}", f"train.global_batch_size={w.micro_batch}",
                 f"train.seq_len={w.seq_len}", "train.precision=bf16", f"train.zero_stage={zero_stage}",
                 f"train.compile={str(compile_).lower()}", f"model.vocab_size={w.vocab}",
                 f"model.max_seq_len={w.seq_len}", "tracking.mode=disabled"]
    if "bert" in w.preset:
        overrides.append("data.tokenizer.type=wordpiece")
    return load_config(CONFIGS / "models" / f"{w.preset}.yaml", overrides)


def random_batches(w: Workload, arch: str, device: torch.device, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, w.vocab, (w.micro_batch, w.seq_len), generator=g)
        if arch == "gpt":
            y = torch.randint(0, w.vocab, (w.micro_batch, w.seq_len), generator=g)
        else:  # MLM: 15% of positions carry a label
            y = torch.full_like(x, -100)
            m = torch.rand(x.shape, generator=g) < 0.15
            y[m] = x[m]
        out.append((x.to(device), y.to(device)))
    return out


def hf_model(model_cfg) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from pipeline.models.hf import hf_config

    kw = {k: v for k, v in hf_config(model_cfg).items() if k not in ("architectures", "model_type")}
    return GPT2LMHeadModel(GPT2Config(**kw)) if model_cfg.arch == "gpt" else BertForMaskedLM(BertConfig(**kw))


def build_step(impl: str, w: Workload, compile_: bool, device: torch.device):
    """(a function doing one optimizer step on a batch, the module) for ``impl``."""
    import deepspeed

    cfg = pipeline_config(w, compile_ and impl == OURS, zero_stage=2)
    torch.manual_seed(0)
    if impl == OURS:
        engine = our_engine.initialize(build_model(cfg.model), cfg, 1)
        return _engine_step(engine, lambda x, y: engine(x, y)), engine
    fused = device.type == "cuda"
    if impl == HF:
        model = hf_model(cfg.model)
        compiled = torch.compile(model) if compile_ else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=our_engine.deepspeed_config(cfg, 1))
        if cfg.model.arch == "gpt":  # HF shifts the labels itself: it gets the unshifted sequence
            return _engine_step(engine, lambda x, y: compiled(input_ids=x, labels=x).loss), engine
        return _engine_step(engine, lambda x, y: compiled(input_ids=x, labels=y).loss), engine
    gpt2_shape = cfg.model.arch == "gpt" and cfg.model.position == "learned" and cfg.model.norm == "layernorm"
    model = (NanoGPT(cfg.model) if gpt2_shape else build_model(cfg.model)).to(device)
    compiled = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)

    def plain(x, y):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return plain, model


def _engine_step(engine, forward):
    def step(x, y):
        loss = forward(x, y)
        engine.backward(loss)
        engine.step()
    return step


def time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per optimizer step after ``warmup`` untimed ones (compilation happens there)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        step(x, y)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, w: Workload, impl: str, args, device: torch.device) -> dict:
    import gc

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, module = build_step(impl, w, args.compile, device)
    cfg = pipeline_config(w, False, zero_stage=2)
    seconds = time_steps(step, random_batches(w, cfg.model.arch, device), args.warmup, args.steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    tokens_per_s = w.micro_batch * w.seq_len / seconds
    row = {
        "workload": name, "impl": impl, "preset": w.preset, "seq_len": w.seq_len, "micro_batch": w.micro_batch,
        "vocab": w.vocab, "params": param_count(cfg.model), "tokens_per_s": tokens_per_s,
        "samples_per_s": w.micro_batch / seconds, "step_ms": seconds * 1e3,
        "mfu": tokens_per_s * train_flops_per_token(cfg.model, w.seq_len) / (args.peak_tflops * 1e12),
        "peak_gib": peak,
        "plan_estimate_gib": memory_per_gpu(cfg.model, cfg.train, 1).total / 2**30 if impl == OURS else None,
        "compiled": args.compile, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    del step, module
    gc.collect()
    return row


def ratios(rows: list[dict]) -> dict:
    """ours ÷ each baseline, per workload (tokens/s)."""
    out: dict = {}
    for r in rows:
        if r["impl"] == OURS:
            for b in rows:
                if b["workload"] == r["workload"] and b["impl"] != OURS:
                    out.setdefault(r["workload"], {})[f"ours/{b['impl']}"] = r["tokens_per_s"] / b["tokens_per_s"]
    return out


def print_table(rows: list[dict], peak_tflops: float) -> None:
    print(f"\n{'workload':<12}{'implementation':<28}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}"
          f"   (MFU vs {peak_tflops:g} TFLOP/s)")
    for r in rows:
        gib = lambda v: f"{v:.2f}" if v is not None else "—"  # noqa: E731
        print(f"{r['workload']:<12}{r['impl']:<28}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}"
              f"{gib(r['peak_gib']):>10}{gib(r['plan_estimate_gib']):>10}")
    for workload, rs in ratios(rows).items():
        print(f"{workload}: " + ", ".join(f"{k} {v:.2f}×" for k, v in rs.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="gpt2-124m",
                   help=f"comma-separated, from {', '.join(WORKLOADS)}, or 'all'")
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU check (compile off unless --compile)")
    p.add_argument("--impl", default=None, help=f"comma-separated subset of {OURS}, {HF}, {PLAIN}")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every implementation (default: on, off with --smoke)")
    p.add_argument("--out", type=Path, help="write the rows and ratios as JSON here")
    args = p.parse_args(argv)
    args.compile = (not args.smoke) if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    table = SMOKE if args.smoke else WORKLOADS
    names = list(table) if args.smoke or args.workload == "all" else args.workload.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"--workload: unknown {', '.join(unknown)}; choose from {', '.join(table)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_single_process()
    rows = []
    for name in names:
        impls = [i for i in table[name].impls if args.impl is None or i in args.impl.split(",")]
        for impl in impls:
            print(f"[throughput] {name} {impl}: warm-up {args.warmup}, timed {args.steps}", flush=True)
            rows.append(measure(name, table[name], impl, args, device))
            write_json(args, rows)  # after every row: a run cut off by its time limit keeps what it measured
    print_table(rows, args.peak_tflops)
    return 0


def write_json(args, rows: list[dict]) -> None:
    if not args.out:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": rows, "ratios": ratios(rows), "peak_tflops": args.peak_tflops, "torch": torch.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:]}
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=False))


if __name__ == "__main__":
    sys.exit(main())
