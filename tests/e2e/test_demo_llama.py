"""`pretrain demo --config configs/demo-llama.yaml`: the whole flow on CPU with a Llama-style decoder
(RoPE, RMSNorm, SwiGLU, grouped-query attention) and packed documents masked apart."""

import json

import pytest
import yaml

from conftest import pretrain

pytestmark = pytest.mark.e2e

STEPS = 30  # a third of a minute of training on two ranks; the loss has fallen well by then


def test_llama_demo_prepares_trains_on_two_ranks_evaluates_and_its_loss_falls(tmp_path):
    run = tmp_path / "demo"
    out = pretrain("demo", "--config", "configs/demo-llama.yaml", "--run-dir", str(run),
                   "--set", f"train.max_steps={STEPS}", "--set", f"checkpoint.save_interval_steps={STEPS}",
                   "--set", "train.log_interval_steps=10", "--set", "eval.max_samples=64", timeout=600)
    assert "world size 2" in out.stdout and "demo finished" in out.stdout
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["document_masking"] is True
    assert (cfg["model"]["position"], cfg["model"]["n_kv_heads"], cfg["model"]["n_head"]) == ("rope", 2, 4)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(val) == [0, STEPS]
    assert val[STEPS] < val[0] - 1.0  # from ~ln(4096) = 8.3: clearly learning, not noise
    record = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "eval.json").read_text())
    assert record["loss"] == pytest.approx(record["splits"]["validation"]["loss"])
    assert record["loss"] < val[0] - 1.0


@pytest.mark.slow
def test_modernbert_demo_runs_the_same_flow_with_packed_segments(tmp_path):
    """The encoder twin (about 45 s): WordPiece, rows of [CLS] piece [SEP] …, masked LM."""
    run = tmp_path / "demo"
    out = pretrain("demo", "--config", "configs/demo-modernbert.yaml", "--run-dir", str(run),
                   "--set", f"train.max_steps={STEPS}", "--set", f"checkpoint.save_interval_steps={STEPS}",
                   "--set", "eval.max_samples=64", timeout=600)
    assert "demo finished" in out.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert val[STEPS] < val[0] - 1.0
