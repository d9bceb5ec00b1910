"""The planner's memory estimate against a measured peak: one rank, DeepSpeed as `pretrain train` sets
it up, a few steps on random tokens.

    python benchmarks/plan_memory.py            # CPU: peak RSS growth (noisy: allocator caches, libs)
    python benchmarks/plan_memory.py --device cuda   # GPU: torch.cuda.max_memory_allocated

Each case runs in a fresh process. On CPU the measurement is the growth of the peak resident set size
over a baseline taken after torch and DeepSpeed are imported, so it also counts glibc's allocator
slack and DeepSpeed's own buffers; on GPU it is what PyTorch's allocator handed out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [  # (precision, zero stage, activation checkpointing)
    ("fp32", 0, False), ("fp32", 1, False), ("fp32", 2, False), ("bf16", 1, False), ("fp32", 1, True),
]
MODEL = ["model.n_layer=8", "model.n_head=8", "model.d_model=512", "model.vocab_size=8192",
         "model.max_seq_len=256", "train.seq_len=256", "train.micro_batch_size_per_gpu=4",
         "train.global_batch_size=4", "train.max_steps=3"]


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(precision: str, stage: int, recompute: bool, device: str) -> dict:
    import deepspeed  # noqa: F401  (imported before the baseline)
    import torch

    from pipeline.config import load_config
    from pipeline.launch.local import free_port
    from pipeline.models import build_model
    from pipeline.plan import memory_per_gpu
    from pipeline.train.engine import init_distributed, initialize

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cfg = load_config(None, MODEL + [f"train.precision={precision}", f"train.zero_stage={stage}",
                                     f"model.activation_checkpointing={str(recompute).lower()}"])
    init_distributed(cfg)
    baseline = _rss_peak_bytes()
    torch.manual_seed(0)
    engine = initialize(build_model(cfg.model), cfg, 1)
    for _ in range(cfg.train.max_steps):
        x = torch.randint(0, 8192, (4, 256), device=engine.device)
        loss = engine(x, x)
        engine.backward(loss)
        engine.step()
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = _rss_peak_bytes() - baseline
    est = memory_per_gpu(cfg.model, cfg.train, 1)
    return {"precision": precision, "zero_stage": stage, "recompute": recompute,
            "estimate_mib": est.total / 2**20, "model_states_mib": est.model_states / 2**20,
            "measured_mib": measured / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        precision, stage, recompute = json.loads(args.case)
        print(json.dumps(run_case(precision, stage, recompute, args.device)))
        return
    env = dict(os.environ, DS_ACCELERATOR=args.device, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    print(f"{'precision':<9} {'ZeRO':>4} {'recompute':>9} {'states MiB':>10} {'estimate MiB':>12} "
          f"{'measured MiB':>12} {'ratio':>6}   ({args.device}, 1 rank, "
          f"{'peak RSS growth' if args.device == 'cpu' else 'max_memory_allocated'})")
    for case in CASES:
        done = subprocess.run([sys.executable, __file__, "--device", args.device, "--case", json.dumps(case)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{case}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['precision']:<9} {r['zero_stage']:>4} {str(r['recompute']):>9} {r['model_states_mib']:>10.0f} "
              f"{r['estimate_mib']:>12.0f} {r['measured_mib']:>12.0f} {r['measured_mib'] / r['estimate_mib']:>6.2f}")


if __name__ == "__main__":
    main()
