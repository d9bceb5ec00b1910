"""BERT end to end through the CLI: WordPiece prepare → 2-rank masked-LM training → eval → export."""

import json

import pytest

from conftest import pretrain

pytestmark = pytest.mark.e2e


def test_bert_prepares_trains_evaluates_and_exports(tmp_path, corpus):
    sets = [
        f"run_dir={tmp_path / 'run'}", f"data.output_dir={tmp_path / 'data'}",
        f"data.sources=[{{path: '{corpus[0]}'}}]", "data.tokenizer.vocab_size=1024", "model.max_seq_len=64",
        "train.seq_len=64", "train.micro_batch_size_per_gpu=4", "train.global_batch_size=8",
        "train.max_steps=8", "train.log_interval_steps=4", "checkpoint.save_interval_steps=8",
        "eval.max_samples=32", "eval.micro_batch_size=8", "optim.lr=2e-3", "train.nproc_per_node=2",
    ]
    args = [a for s in sets for a in ("--set", s)]
    pretrain("prepare", "configs/demo-bert.yaml", *args)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["type"] == "wordpiece"
    assert {"cls", "sep", "mask", "pad", "eod"} <= set(manifest["tokenizer"]["special_ids"])
    out = pretrain("train", "configs/demo-bert.yaml", *args)
    assert "world size 2" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert val[-1] < val[0]  # masked-LM loss goes down
    pretrain("eval", str(tmp_path / "run"))
    result = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "eval.json").read_text())
    split = result["splits"]["validation"]
    assert 0.0 <= split["acc_top1"] <= split["acc_top5"] <= 1.0
    pretrain("export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf"))
    from transformers import BertForMaskedLM

    assert BertForMaskedLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2
