"""The real `pretrain` CLI on tiny configs: prepare, train, eval, export, and its errors."""

import json
import shutil
import time

import numpy as np
import pytest

from conftest import pretrain
from helpers.wandb_log import offline_runs, read_run
from pipeline.data.shards import IndexedShard
from tokenizers import Tokenizer

pytestmark = pytest.mark.e2e


def test_help_lists_only_built_subcommands():
    out = pretrain("--help").stdout
    for cmd in ("prepare", "train", "eval", "export", "demo"):
        assert cmd in out
    for cmd in ("prepare", "train", "eval", "export", "demo"):
        assert "usage: pretrain " + cmd in pretrain(cmd, "--help").stdout


def test_shards_decode_back_to_the_input_text(trained_run, corpus):
    data = trained_run["data_dir"]
    manifest = json.loads((data / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    eod = manifest["tokenizer"]["special_ids"]["eod"]
    decoded = []
    for split in ("train", "validation"):
        for prefix in manifest["splits"][split]["sources"]["docs"]["shards"]:
            shard = IndexedShard(data / prefix)
            assert shard.dtype == np.uint16
            for i in range(len(shard)):
                ids = shard[i].tolist()
                assert ids[-1] == eod and eod not in ids[:-1]
                decoded.append(tok.decode(ids[:-1]))
    texts = corpus[1]
    assert sorted(decoded) == sorted(texts)  # every document, once, byte for byte
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == len(texts)


def test_prepare_quarantines_bad_records_with_reasons(tmp_path, corpus):
    src = tmp_path / "mixed.jsonl"
    good = corpus[0].read_text().splitlines()[:60]
    bad = ['{"text": ', '{"text": 3}', '[1]', '{"other": "x"}', '{"text": ""}']
    src.write_bytes(("\n".join(good + bad) + "\n").encode() + b'{"text": "\xff bad"}\n')
    out = tmp_path / "data"
    pretrain("prepare", "configs/demo.yaml", "--set", f"data.output_dir={out}", "--set",
             f"data.sources=[{{path: '{src}'}}]", "--set", "data.tokenizer.vocab_size=512")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["records"] == 66 and manifest["sources"][0]["kept"] == 60
    assert manifest["quarantine"]["by_reason"] == {
        "malformed_json": 1, "not_a_string": 1, "not_an_object": 1, "missing_field": 1, "empty_text": 1,
        "invalid_utf8": 1}
    rows = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == list(range(61, 67))
    assert all(r["source"] == str(src) and r["reason"] for r in rows)


def test_second_prepare_with_same_inputs_does_no_work(trained_run):
    before = (trained_run["data_dir"] / "manifest.json").stat().st_mtime_ns
    out = pretrain("prepare", "configs/demo.yaml", *trained_run["sets"])
    assert "up to date" in out.stdout
    assert (trained_run["data_dir"] / "manifest.json").stat().st_mtime_ns == before


def test_eval_refuses_a_run_without_committed_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)  # written, never committed
    proc = pretrain("eval", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "no committed checkpoint" in proc.stderr and "COMMIT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_scores_newest_checkpoint_and_logs_beside_training(trained_run):
    run = trained_run["run_dir"]
    pretrain("eval", str(run))
    result = json.loads((run / "checkpoints" / "step_00000006" / "eval.json").read_text())
    assert result["step"] == 6 and result["loss"] > 0 and result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    runs = {r["run"]["job_type"]: r for r in map(read_run, offline_runs(run))}
    assert runs["train"]["run"]["group"] == runs["eval"]["run"]["group"]
    assert runs["train"]["run"]["project"] == runs["eval"]["run"]["project"]
    train_keys = set().union(*runs["train"]["history"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss"} <= train_keys
    assert [h["_step"] for h in runs["train"]["history"] if "train/loss" in h] == [2, 4, 6]
    eval_rows = [h for h in runs["eval"]["history"] if "eval/validation/loss" in h]
    assert eval_rows[-1]["train/step"] == 6
    assert eval_rows[-1]["eval/validation/loss"] == pytest.approx(result["loss"])


def test_training_loss_drops(trained_run):
    rows = [json.loads(line) for line in (trained_run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert val[-1] < val[0] - 0.3


def test_config_error_exits_2_with_one_line_naming_the_field(tmp_path):
    start = time.time()
    proc = pretrain("train", "configs/demo.yaml", "--set", "train.zero_stage=9", "--set", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.zero_stage" in lines[0]
    assert not (tmp_path / "config.yaml").exists()  # nothing started
    assert time.time() - start < 30


def test_export_loads_in_transformers_with_equal_logits(trained_run, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from pipeline.config import ModelConfig
    from pipeline.models import build_model, load_state_dict_tied
    from pipeline.train.checkpoint import latest_committed

    pretrain("export", str(trained_run["run_dir"]), "--to", "hf", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    latest = latest_committed(trained_run["run_dir"] / "checkpoints")
    ours = build_model(ModelConfig.model_validate(latest.trainer_state()["model"])).eval()
    load_state_dict_tied(ours, load_file(str(latest.path / "model.safetensors")))
    x = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
