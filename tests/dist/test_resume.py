"""Exact resume: a run stopped at step K and resumed to N logs the same losses, bit for bit, as a run
straight to N — fp32 and bf16, ZeRO 1, 2 and 3 — and the ZeRO stages agree with ZeRO-0.

To keep this cheap every training of a test runs inside one 2-rank torchrun: this file is also the
worker (``python tests/dist/test_resume.py SPEC.json`` under torchrun), which calls `train()` once
per job of the spec in the same two processes, so Python, torch and DeepSpeed start once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist

TINY = ["train.seq_len=32", "train.micro_batch_size_per_gpu=2", "train.global_batch_size=8",
        "train.max_steps=4", "train.log_interval_steps=1", "checkpoint.save_interval_steps=2",
        "eval.max_samples=8", "eval.micro_batch_size=2", "tracking.mode=disabled", "train.nproc_per_node=1"]


def run_jobs(config: Path, jobs: list[dict], tmp: Path, nproc: int = 2, timeout: int = 600) -> list[dict]:
    """Run ``jobs`` ({"run_dir", "overrides", "env"}) one after the other in ``nproc`` torchrun ranks."""
    spec = tmp / f"spec-{os.getpid()}-{len(list(tmp.glob('spec-*')))}.json"
    spec.write_text(json.dumps({"config": str(config), "jobs": jobs, "out": str(spec) + ".out"}))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         str(Path(__file__)), str(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(Path(str(spec) + ".out").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    """Step → train/loss as logged (a resumed run appends to the same metrics.jsonl)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def job(run_dir: Path, *overrides: str, env: dict | None = None) -> dict:
    return {"run_dir": str(run_dir), "overrides": [*TINY, f"run_dir={run_dir}", *overrides], "env": env or {}}


MATRIX = [("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 1), ("bf16", 2), ("bf16", 3)]


@pytest.fixture(scope="module")
def resume_runs(trained_run, tmp_path_factory):
    """For each (precision, stage): a run to step 4, and a run stopped at 2 then resumed to 4."""
    tmp = tmp_path_factory.mktemp("resume")
    config = trained_run["run_dir"] / "config.yaml"
    jobs, dirs = [], {}
    for precision, stage in MATRIX:
        sets = (f"train.precision={precision}", f"train.zero_stage={stage}")
        full, split = tmp / f"{precision}-z{stage}-full", tmp / f"{precision}-z{stage}-split"
        jobs += [job(full, *sets), job(split, *sets, "train.stop_at_step=2"), job(split, *sets)]
        dirs[precision, stage] = (full, split)
    z0 = tmp / "fp32-z0-full"
    jobs.append(job(z0, "train.precision=fp32", "train.zero_stage=0"))
    offload, infinity = tmp / "z2-offload-split", tmp / "z3-offload-params-actckpt"
    off = ("train.zero_stage=2", "train.offload_optimizer=true")
    jobs += [job(offload, *off, "train.stop_at_step=2"), job(offload, *off),
             job(infinity, "train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                 "model.activation_checkpointing=true")]
    clock = tmp / "save-on-the-clock"
    jobs.append(job(clock, "checkpoint.save_interval_steps=null", "checkpoint.save_interval_minutes=0.0001",
                    "checkpoint.keep_last=1", "checkpoint.keep_every_steps=2"))
    results = run_jobs(config, jobs, tmp)
    return {"dirs": dirs, "z0": z0, "offload": offload, "infinity": infinity, "clock": clock, "results": results}


@pytest.mark.parametrize(("precision", "stage"), MATRIX)
def test_stopped_and_resumed_run_logs_bitwise_identical_losses(resume_runs, precision, stage):
    from pipeline.train import checkpoint as ckpt

    full, split = resume_runs["dirs"][precision, stage]
    want, got = losses(full), losses(split)
    assert sorted(want) == [1, 2, 3, 4]
    assert got == want  # float equality: every step, before and after the resume
    assert [c.step for c in ckpt.committed_checkpoints(split / "checkpoints")] == [2, 4]


def test_stop_at_step_commits_the_same_checkpoint_as_the_uninterrupted_run(resume_runs):
    full, split = resume_runs["dirs"]["bf16", 2]
    a = (full / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes()
    b = (split / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes()
    assert a == b


def test_metrics_rows_carry_speed_memory_and_health(resume_runs):
    rows = [json.loads(line) for line in (resume_runs["dirs"]["bf16", 2][0] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/tflops_per_device",
                "train/data_wait_share", "train/peak_memory_gib", "train/skipped_steps", "train/consumed_samples"):
        assert all(key in r for r in train), key
    assert all("train/mfu" not in r for r in train)  # CPU: no peak to divide by, so no guessed MFU
    assert all(0 <= r["train/data_wait_share"] <= 1 and r["train/peak_memory_gib"] > 0 for r in train)
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 2, 4]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_zero0_losses(resume_runs, stage):
    """Same data, same init: ZeRO partitions the optimizer, not the math. Reduction order differs
    (reduce-scatter vs all-reduce of flat buffers), so equal to within 1e-5 relative, not bitwise."""
    z0 = losses(resume_runs["z0"])
    zs = losses(resume_runs["dirs"]["fp32", stage][0])
    assert zs == pytest.approx(z0, rel=1e-5)


def test_optimizer_offload_trains_and_resumes_like_zero2(resume_runs):
    """ZeRO-2 + CPU optimizer offload (DeepSpeed's optimizer block, torch AdamW on a CPU-only box),
    stopped and resumed; ZeRO-3 + parameter offload + activation checkpointing straight through."""
    ref = losses(resume_runs["dirs"]["fp32", 2][0])
    assert losses(resume_runs["offload"]) == pytest.approx(ref, rel=1e-5)
    assert losses(resume_runs["infinity"]) == pytest.approx(losses(resume_runs["z0"]), rel=1e-5)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(resume_runs, trained_run, tmp_path):
    """train.compile (DeepSpeed's engine.compile(), inductor): about 1.5 min of compiling on a CPU."""
    run = tmp_path / "compiled"
    run_jobs(trained_run["run_dir"] / "config.yaml", [job(run, "train.zero_stage=1", "train.compile=true")],
             tmp_path, nproc=2)
    assert losses(run) == pytest.approx(losses(resume_runs["dirs"]["fp32", 1][0]), rel=1e-4)


def test_save_interval_minutes_saves_on_the_clock_and_keep_every_steps_retains(resume_runs):
    """No step interval, a 6 ms clock: every step is due. Retention then keeps the newest one plus
    every multiple of 2."""
    from pipeline.train import checkpoint as ckpt

    found = ckpt.committed_checkpoints(resume_runs["clock"] / "checkpoints")
    assert [c.step for c in found] == [2, 4]
    rows = [json.loads(line) for line in (resume_runs["clock"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 1, 2, 3, 4]  # a validation at each save


def test_consolidate_rebuilds_model_safetensors_from_zero_shards(resume_runs, tmp_path):
    from safetensors.torch import load_file

    from conftest import pretrain

    for stage in (2, 3):
        ckpt_dir = resume_runs["dirs"]["fp32", stage][0] / "checkpoints" / "step_00000004"
        out = tmp_path / f"z{stage}.safetensors"
        proc = pretrain("consolidate", str(ckpt_dir), str(out))
        assert "identical to model.safetensors" in proc.stdout
        a, b = load_file(str(out)), load_file(str(ckpt_dir / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _worker(spec_path: str) -> None:
    """One rank: run every job of the spec in this process, in order."""
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.train.guards import TrainingHalted
    from pipeline.train.loop import train

    spec = json.loads(Path(spec_path).read_text())
    results = []
    for j in spec["jobs"]:
        saved_env = {k: os.environ.get(k) for k in j["env"]}
        os.environ.update(j["env"])
        try:
            results.append({"summary": train(load_config(spec["config"], j["overrides"]), log=print)})
        except TrainingHalted as exc:
            results.append({"halted": str(exc)})
        finally:
            for k, v in saved_env.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
