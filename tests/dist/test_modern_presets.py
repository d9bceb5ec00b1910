"""The Llama- and ModernBERT-style presets go through everything a GPT-2 run does.

llama-tiny (grouped-query attention, document masking) and modernbert-tiny (rows packed from
whole segments, local and global layers), each on 2 gloo ranks: a run stopped at step 2 and
resumed logs bit for bit the losses of a run straight to 4; a 2-rank checkpoint continues on 1
rank through a universal checkpoint, every sample read once; the checkpoint exports to
transformers' LlamaForCausalLM / ModernBertForMaskedLM with our logits; `pretrain eval` scores it.

As in test_resume.py, every training runs in one torchrun per world size: this file is also the
worker (``python tests/dist/test_modern_presets.py SPEC.json``), so torch and DeepSpeed start twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist

PRESETS = {"llama": "configs/demo-llama.yaml", "modernbert": "configs/demo-modernbert.yaml"}
GB, MICRO, N, K, SEQ = 8, 2, 4, 2, 32
TINY = [f"train.seq_len={SEQ}", f"train.micro_batch_size_per_gpu={MICRO}", f"train.global_batch_size={GB}",
        f"train.max_steps={N}", "train.log_interval_steps=1", f"checkpoint.save_interval_steps={K}",
        "eval.max_samples=8", "eval.micro_batch_size=4", "tracking.mode=disabled", "train.nproc_per_node=1"]


def run_jobs(jobs: list[dict], tmp: Path, nproc: int) -> list[dict]:
    """Run ``jobs`` ({"config", "overrides"}) one after the other in ``nproc`` torchrun ranks."""
    spec = tmp / f"spec-{nproc}.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(spec) + ".out"}))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         str(Path(__file__)), str(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(Path(str(spec) + ".out").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Per preset: a prepared dataset; runs "full" (to 4), "split" (2, then 4) and "elastic" (2 on
    2 ranks, then 4 on 1 rank), all ZeRO-2 fp32."""
    from conftest import pretrain

    tmp = tmp_path_factory.mktemp("modern")
    jobs2, jobs1, out = [], [], {}
    for name, config in PRESETS.items():
        data = tmp / f"{name}-data"
        base = [f"data.output_dir={data}", f"data.sources=[{{path: '{corpus[0]}'}}]", "data.tokenizer.vocab_size=1024"]
        pretrain("prepare", config, *[a for s in base for a in ("--set", s)])
        dirs = {kind: tmp / f"{name}-{kind}" for kind in ("full", "split", "elastic")}
        job = lambda kind, *extra: {"config": config, "overrides": [*base, *TINY, f"run_dir={dirs[kind]}", *extra]}
        jobs2 += [job("full"), job("split", f"train.stop_at_step={K}"), job("split"),
                  job("elastic", f"train.stop_at_step={K}")]
        jobs1.append(job("elastic"))
        out[name] = {"config": config, "data": data, "base": base, **dirs}
    two = run_jobs(jobs2, tmp, nproc=2)
    for k, (name, said) in enumerate(zip(PRESETS, run_jobs(jobs1, tmp, nproc=1))):
        out[name]["resume_log"], out[name]["elastic_log"] = two[4 * k + 2]["log"], said["log"]
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_stopped_and_resumed_run_logs_bitwise_identical_losses(runs, name):
    import yaml

    cfg = yaml.safe_load((runs[name]["split"] / "checkpoints" / f"step_{N:08d}" / "config.yaml").read_text())
    assert cfg["data"]["document_masking"] is True
    assert cfg["model"]["n_kv_heads"] == (2 if name == "llama" else None)  # llama: grouped-query attention
    assert any(f"at step {K}" in line and "resumed from" in line for line in runs[name]["resume_log"])
    want, got = losses(runs[name]["full"]), losses(runs[name]["split"])
    assert sorted(want) == [1, 2, 3, 4] and got == want  # float equality, before and after the resume


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_two_rank_checkpoint_continues_on_one_rank_reading_every_sample_once(runs, name):
    from pipeline.config import load_config
    from pipeline.data.loader import BlendedSamples, open_split, rank_positions
    from pipeline.data.manifest import verify_manifest
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.state import digest_update

    r = runs[name]
    assert any("universal checkpoint" in line for line in r["elastic_log"])
    state = ckpt.latest_committed(r["elastic"] / "checkpoints").trainer_state()
    segments = state["data_segments"] + [{"start_step": K, "end_step": N, "world_size": 1,
                                           "sample_digests": state["sample_digests"]}]
    assert [(s["start_step"], s["end_step"], s["world_size"]) for s in segments] == [(0, K, 2), (K, N, 1)]
    cfg = load_config(r["config"], r["base"])
    data = BlendedSamples(open_split(r["data"], verify_manifest(r["data"]), "train", SEQ, arch=cfg.model.arch,
                                     seed=cfg.train.seed, document_masking=True), {"docs": 1.0}, cfg.train.seed)
    seen = []
    for s in segments:
        world = s["world_size"]
        for rank in range(world):
            digest = empty = hashlib.sha256().hexdigest()
            for step in range(s["start_step"], s["end_step"]):
                for m in range(GB // (MICRO * world)):
                    pos = rank_positions(step * GB, m, rank, world, MICRO)
                    seen += pos.tolist()
                    digest = digest_update(digest, *data.ids(pos))
            assert s["sample_digests"][rank] == digest != empty  # exactly this rank's slice
    assert sorted(seen) == list(range(N * GB))
    ref, moved = losses(r["full"]), losses(r["elastic"])
    assert [moved[1], moved[2]] == [ref[1], ref[2]]
    assert [moved[3], moved[4]] == pytest.approx([ref[3], ref[4]], rel=1e-5)
    assert not list((r["elastic"] / "checkpoints").glob(".universal/*"))


def _ours_and_transformers(run: Path, out: Path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from pipeline.config import ModelConfig
    from pipeline.eval.evaluate import load_model
    from pipeline.export import export_hf
    from pipeline.train import checkpoint as ckpt

    latest = ckpt.latest_committed(run / "checkpoints")
    export_hf(latest.path, out, log=lambda *a: None)
    cfg = ModelConfig.model_validate(latest.state().model)
    ours = load_model(latest.path, cfg, "cpu")
    auto = AutoModelForCausalLM if cfg.arch == "gpt" else AutoModelForMaskedLM
    theirs = auto.from_pretrained(out, attn_implementation="eager", torch_dtype=torch.float32).eval()
    return cfg, ours, theirs


@pytest.mark.parametrize(("name", "cls"), [("llama", "LlamaForCausalLM"), ("modernbert", "ModernBertForMaskedLM")])
def test_checkpoint_exports_to_transformers_with_our_logits(runs, name, cls, tmp_path):
    from pipeline.data.loader import open_split
    from pipeline.data.manifest import verify_manifest

    cfg, ours, theirs = _ours_and_transformers(runs[name]["full"], tmp_path / "hf")
    assert type(theirs).__name__ == cls
    data, manifest, V = runs[name]["data"], verify_manifest(runs[name]["data"]), cfg.vocab_size
    plain = next(iter(open_split(data, manifest, "validation", SEQ, arch=cfg.arch).values()))
    ids = plain.batch([0, 1])[0]  # (2, T) real tokens, one window across documents
    packed = next(iter(open_split(data, manifest, "validation", SEQ, arch=cfg.arch, document_masking=True).values()))
    rows = packed.batch(list(range(min(len(packed), 64))))
    busiest = int(rows.doc_ids.amax(dim=1).argmax())  # the row with the most documents in it
    batch = packed.batch([busiest])
    docs = batch.doc_ids[0]
    starts = [0, *(torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1).tolist(), SEQ]
    assert len(starts) >= 3  # two documents or more in the row
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits[..., :V], ours(ids)[..., :V], atol=1e-4, rtol=0)
        ours_packed = ours(batch[0], doc_ids=batch.doc_ids)[0, :, :V]  # (T, V)
        for a, b in zip(starts, starts[1:]):  # each document of the packed row as transformers sees it alone
            alone = theirs(input_ids=batch[0][:, a:b]).logits[0, :, :V]
            torch.testing.assert_close(ours_packed[a:b], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_pretrain_eval_scores_the_checkpoint_document_by_document(runs, name):
    from conftest import pretrain

    run = runs[name]["full"]
    out = pretrain("eval", str(run))
    assert f"step {N}" in out.stdout
    record = json.loads((run / "checkpoints" / f"step_{N:08d}" / "eval.json").read_text())
    val = record["splits"]["validation"]
    assert 0.0 < val["loss"] < np.log(1024) + 1 and 0.0 <= val["acc_top1"] <= val["acc_top5"] <= 1.0
    if name == "llama":  # no target across a document end: fewer labels than tokens
        assert val["tokens"] < val["samples"] * SEQ


def _worker(spec_path: str) -> None:
    """One rank: run every job of the spec in this process, in order."""
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.train.loop import train

    spec = json.loads(Path(spec_path).read_text())
    results = []
    for j in spec["jobs"]:
        said: list[str] = []
        train(load_config(j["config"], j["overrides"]), log=lambda line, *a, **k: said.append(str(line)))
        results.append({"log": said})
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
