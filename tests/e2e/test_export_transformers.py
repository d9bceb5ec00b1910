"""Exports of real trained runs, used as a new user would: with transformers only (Auto classes and
pipelines), no code of ours; generation stops at the exported eos; the model card says what it is."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pretrain
from test_tracking_resume import copy_run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus) -> dict:
    """prepare (WordPiece) + a short 1-rank masked-LM run of 4 steps, via the CLI."""
    tmp = tmp_path_factory.mktemp("bert")
    sets = [f"run_dir={tmp / 'run'}", f"data.output_dir={tmp / 'data'}", f"data.sources=[{{path: '{corpus[0]}'}}]",
            "data.tokenizer.vocab_size=1024", "model.max_seq_len=64", "train.seq_len=64",
            "train.micro_batch_size_per_gpu=4", "train.global_batch_size=4", "train.max_steps=4",
            "checkpoint.save_interval_steps=4", "train.nproc_per_node=1", "optim.lr=2e-3"]
    args = [a for s in sets for a in ("--set", s)]
    pretrain("prepare", "configs/demo-bert.yaml", *args)
    pretrain("train", "configs/demo-bert.yaml", *args)
    return {"run_dir": tmp / "run", "data_dir": tmp / "data"}


def _always_eos(model, eod: int) -> None:
    """In transformers' own GPT2LMHeadModel: end-of-document becomes the argmax after every context
    (a constant final hidden state pointing along a large, tied eod embedding row)."""
    with torch.no_grad():
        v = torch.zeros_like(model.transformer.wte.weight[0])
        v[0] = 100.0
        model.transformer.wte.weight[eod] = v
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)


def test_a_trained_gpt_export_works_with_transformers_pipelines_and_stops_at_eos(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000006"
    pretrain("eval", str(checkpoint))  # a checkpoint directory, not the run: its eval goes in the card
    out = tmp_path / "hf"
    proc = pretrain("export", str(checkpoint), "--to", "hf", str(out))
    assert "(transformers GPT2LMHeadModel" in proc.stdout
    eod = json.loads((trained_run["data_dir"] / "manifest.json").read_text())["tokenizer"]["special_ids"]["eod"]

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (eod, eod, eod)
    batch = tok(["Return the", "Return a new list of every item"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["attention_mask"].sum(1).tolist()[1]
    model = AutoModelForCausalLM.from_pretrained(out)
    generate = pipeline("text-generation", model=model, tokenizer=tok)
    text = generate("Return a new list", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("Return a new list") and len(text) > len("Return a new list")

    _always_eos(model, eod)
    prompt = tok("Return a new list", return_tensors="pt")
    new = model.generate(**prompt, max_new_tokens=10, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert new.tolist() == [eod]  # the eos, then it stopped: generation_config.json declares it

    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and str(trained_run["data_dir"]) in card
    assert "step 6 of 6" in card and f"{48 * 64:,} tokens trained" in card  # 6 steps × 8 samples × 64 tokens
    assert "| eval/validation/loss |" in card and f"pretrain export {checkpoint} --to hf {out}" in card


def test_a_trained_bert_export_works_with_the_fill_mask_pipeline(bert_run, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    out = tmp_path / "hf"
    proc = pretrain("export", str(bert_run["run_dir"]), "--to", "hf", str(out))
    assert "(transformers BertForMaskedLM" in proc.stdout
    ids = json.loads((bert_run["data_dir"] / "manifest.json").read_text())["tokenizer"]["special_ids"]

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id) == \
        (ids["cls"], ids["sep"], ids["mask"], ids["pad"])
    enc = tok("Return a new list")["input_ids"]
    assert enc[0] == ids["cls"] and enc[-1] == ids["sep"]  # the [CLS] … [SEP] post-processor
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(out), tokenizer=tok)
    guesses = fill(f"Return a new {tok.mask_token} of items", top_k=3)
    assert len(guesses) == 3 and all(g["sequence"] and g["token"] != ids["mask"] for g in guesses)

    card = (out / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "step 4 of 4" in card and "Not evaluated" in card
