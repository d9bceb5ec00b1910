"""The CUDA paths on one GPU, each through the real `pretrain train` (single-process route, our
engine): bf16 and fp16 steps, ZeRO 0–3, the fused attention kernel, the NaN guard under fp16 loss
scaling, bitwise resume, and the planner's memory estimate against the measured peak.

CI has no GPU: the whole module is skipped there (and `-m "not gpu"` deselects it). On the GPU
machine `benchmarks/gpu_check.sh` runs it. The training runs are independent tiny jobs, so the
module fixture starts them side by side on the one card: process start-up, not the GPU, is the cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import pretrain, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")]

TINY = ["train.seq_len=64", "train.micro_batch_size_per_gpu=4", "train.global_batch_size=8",
        "train.max_steps=4", "train.log_interval_steps=1", "checkpoint.save_interval_steps=2",
        "eval.max_samples=8", "eval.micro_batch_size=4", "tracking.mode=disabled", "train.nproc_per_node=1"]
STEPS = [("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp16", 0), ("fp16", 2)]
NAN_AT_STEP_3 = {"PRETRAIN_FAULT_NAN_AT_STEP": "3"}


def train_cmd(config: Path, run_dir: Path, *sets: str) -> list[str]:
    args = [a for s in (*TINY, f"run_dir={run_dir}", *sets) for a in ("--set", s)]
    return [sys.executable, "-m", "pipeline.cli", "train", str(config), *args]


def run_chain(chain: list[tuple[list[str], dict]]) -> list[subprocess.CompletedProcess]:
    """Run commands one after the other (a stop then its resume); stops at the first failure."""
    done = []
    for cmd, env in chain:
        done.append(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **env}))
        if done[-1].returncode != 0:
            break
    return done


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus) -> tuple[Path, list[str]]:
    """A prepared tiny dataset: the config, and the --set arguments that point at it."""
    tmp = tmp_path_factory.mktemp("gpu-data")
    sets = tiny_overrides(tmp, f"[{{path: '{corpus[0]}'}}]")
    pretrain("prepare", "configs/demo.yaml", *sets)
    return ROOT / "configs" / "demo.yaml", sets


@pytest.fixture(scope="module")
def cuda_runs(dataset, tmp_path_factory) -> dict:
    """Every training job of this module, side by side; name → (run dir, processes)."""
    config, sets = dataset
    tmp = tmp_path_factory.mktemp("gpu-runs")
    data_sets = [s for s in sets[1::2] if s.startswith("data.")]
    chains: dict[str, tuple[Path, list]] = {}
    for precision, stage in STEPS:
        run = tmp / f"{precision}-z{stage}"
        ps = (*data_sets, f"train.precision={precision}", f"train.zero_stage={stage}")
        chains[f"{precision}-z{stage}"] = (run, [(train_cmd(config, run, *ps), {})])
    split = tmp / "bf16-z2-split"
    ps = (*data_sets, "train.precision=bf16", "train.zero_stage=2")
    chains["bf16-z2-split"] = (split, [(train_cmd(config, split, *ps, "train.stop_at_step=2"), {}),
                                       (train_cmd(config, split, *ps), {})])
    nan = tmp / "fp16-z2-nan"
    ps = (*data_sets, "train.precision=fp16", "train.zero_stage=2", "checkpoint.save_interval_steps=1",
          "checkpoint.keep_last=5")
    chains["fp16-z2-nan"] = (nan, [(train_cmd(config, nan, *ps), NAN_AT_STEP_3)])
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        futures = {name: pool.submit(run_chain, chain) for name, (_run, chain) in chains.items()}
        return {name: (chains[name][0], f.result()) for name, f in futures.items()}


def succeeded(runs: dict, name: str) -> Path:
    run, procs = runs[name]
    last = procs[-1]
    assert last.returncode == 0, f"{name}: exit {last.returncode}\n{last.stdout[-2000:]}\n{last.stderr[-4000:]}"
    return run


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run) if "train/loss" in r}


@pytest.mark.parametrize(("precision", "stage"), STEPS)
def test_training_steps_on_cuda_log_finite_losses(cuda_runs, precision, stage):
    import math

    run = succeeded(cuda_runs, f"{precision}-z{stage}")
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    if precision == "bf16":  # fp16's dynamic loss scale may skip its first steps (overflow at 2^16)
        assert got[4] < got[1]  # it learns (a tiny model on real text drops fast)


def test_stopped_and_resumed_run_on_cuda_logs_bitwise_identical_losses(cuda_runs):
    full, split = succeeded(cuda_runs, "bf16-z2"), succeeded(cuda_runs, "bf16-z2-split")
    assert losses(split) == losses(full)
    a = (full / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes()
    b = (split / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes()
    assert a == b


def test_nan_step_under_fp16_loss_scaling_is_skipped(cuda_runs):
    from pipeline.train import checkpoint as ckpt

    run = succeeded(cuda_runs, "fp16-z2-nan")
    by_step = {r["step"]: r for r in rows(run) if "train/loss" in r or "train/skipped_steps" in r}
    assert "train/loss" not in by_step[3] and by_step[3]["train/skipped_steps"] >= 1
    assert by_step[4]["train/loss"] == by_step[4]["train/loss"]  # finite again after the skip
    state = ckpt.latest_committed(run / "checkpoints").trainer_state()
    assert state["skip_counts"]["nonfinite"] >= 1 and state["step"] == 4


def test_flash_sdpa_runs_our_attention():
    """Our attention call (causal, no mask, grouped and not) on the flash kernel alone: SDPA raises
    when the only allowed backend cannot take the inputs, so passing means flash ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.models.attention_masks import attend, build_mask

    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for n_kv in (8, 2):
        k = torch.randn(2, n_kv, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        mask = build_mask(causal=True, seq_len=256, device=q.device)
        assert mask is None  # plain causal attention needs no mask: the fused path
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = attend(q, k, v, mask, causal=True)
            out.float().sum().backward()
        with sdpa_kernel(SDPBackend.MATH):
            ref = attend(q.detach(), k.detach(), v.detach(), None, causal=True)
        assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.backends.cuda.flash_sdp_enabled()


@pytest.fixture(scope="module")
def memory_case() -> dict:
    """plan_memory's one-rank bf16 ZeRO-1 case, on CUDA, in a fresh process."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_memory.py"), "--device", "cuda", "--case",
         json.dumps(["bf16", 1, False])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cuda"})
    assert done.returncode == 0, done.stderr[-4000:]
    case = json.loads(done.stdout.strip().splitlines()[-1])
    out = os.environ.get("GPU_CHECK_OUT")
    if out:  # gpu_check.sh collects the measured ratio
        Path(out, "memory_estimate.json").write_text(json.dumps(
            {**case, "ratio": case["measured_mib"] / case["estimate_mib"]}, indent=1))
    return case


def test_plan_memory_estimate_is_measured_on_cuda(memory_case):
    assert memory_case["measured_mib"] > 0 and memory_case["estimate_mib"] > 0


@pytest.mark.xfail(strict=False, reason="goal, not yet measured")
def test_plan_memory_estimate_within_15_percent_of_the_cuda_peak(memory_case):
    ratio = memory_case["measured_mib"] / memory_case["estimate_mib"]
    assert 0.85 <= ratio <= 1.15, f"measured / estimate = {ratio:.2f}"
