"""`pretrain eval`: score a committed checkpoint on the validation split, log beside training.

Runs as its own job (one process, no DeepSpeed): it reads only committed checkpoints, loads their
``model.safetensors`` (no unpickling), and writes ``eval.json`` into the checkpoint directory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import ModelConfig, build_config
from pipeline.data.loader import GPTSamples
from pipeline.data.manifest import manifest_sha256, verify_manifest
from pipeline.models import build_model, load_state_dict_tied
from pipeline.tracking import Tracker
from pipeline.train import checkpoint as ckpt


class EvalError(ValueError):
    """Nothing evaluable: no committed checkpoint, or data that does not match it."""


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> ckpt.Committed:
    root = Path(run_dir) / "checkpoints"
    found = ckpt.committed_checkpoints(root)
    if step is not None:
        found = [c for c in found if c.step == step]
    if not found:
        what = f"at step {step}" if step is not None else "at all"
        raise EvalError(
            f"{run_dir}: no committed checkpoint {what} under {root} "
            f"(a checkpoint counts only once its {ckpt.COMMIT} marker exists)"
        )
    ckpt.verify_checkpoint(found[-1].path)
    return found[-1]


def load_model(checkpoint: ckpt.Committed) -> torch.nn.Module:
    state = checkpoint.trainer_state()
    model = build_model(ModelConfig.model_validate(state["model"]))
    load_state_dict_tied(model, load_file(str(checkpoint.path / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def validation_metrics(model: torch.nn.Module, data: GPTSamples, max_samples: int | None, micro: int) -> dict:
    n = min(len(data), max_samples or len(data))
    total_loss, total_tokens = 0.0, 0
    for start in range(0, n, micro):
        x, y = data.batch(range(start, min(start + micro, n)))
        total_loss += model(x, y).item() * y.numel()
        total_tokens += y.numel()
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "samples": n, "tokens": total_tokens}


def evaluate(run_dir: str | Path, step: int | None = None, log=print) -> dict:
    checkpoint = find_checkpoint(run_dir, step)
    cfg = build_config(
        yaml.safe_load((checkpoint.path / "config.yaml").read_text(encoding="utf-8")),
        origin=f"({checkpoint.path / 'config.yaml'})",
    )
    state = checkpoint.trainer_state()
    data_dir = Path(cfg.data.output_dir)
    verify_manifest(data_dir)
    if manifest_sha256(data_dir) != state["data_manifest_sha256"]:
        raise EvalError(f"{data_dir}: the dataset changed since {checkpoint.path} was trained on it")
    t0 = time.time()
    model = load_model(checkpoint)
    data = GPTSamples(data_dir / "validation", cfg.train.seq_len)
    val = validation_metrics(model, data, cfg.eval.max_samples, cfg.eval.micro_batch_size)
    result = {"step": checkpoint.step, "checkpoint": str(checkpoint.path), "split": "validation",
              **val, "seconds": round(time.time() - t0, 2)}
    tracker = Tracker(cfg, Path(run_dir) / "eval_metrics.jsonl", "eval", step_metric="train/step")
    try:
        tracker.log({"eval/loss": val["loss"], "eval/perplexity": val["perplexity"]}, step=checkpoint.step)
        result["wandb_run_id"], result["wandb_dir"] = tracker.run_id, tracker.run_dir
    finally:
        tracker.close()
    out = checkpoint.path / "eval.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    log(f"eval: step {checkpoint.step}: validation loss {val['loss']:.4f}, perplexity "
        f"{val['perplexity']:.2f} over {val['samples']} samples → {out}")
    return result
