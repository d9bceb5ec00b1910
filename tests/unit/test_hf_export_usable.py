"""An export behaves like `save_pretrained`: transformers' Auto classes, pipelines, padding and
generation work on it with nothing but the exported directory (no code of ours)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

from pipeline.config import ModelConfig, TokenizerConfig
from pipeline.data.tokenizer import special_ids, train_tokenizer
from pipeline.models import build_model
from pipeline.models.hf import export_to_hf

pytestmark = pytest.mark.unit

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i % 7} and runs home" for i in range(300)]


def _export(tmp_path, arch: str, doctor=None):
    tok_type = "wordpiece" if arch == "bert" else "bpe"
    tok_cfg = TokenizerConfig(type=tok_type, vocab_size=300 if arch == "bert" else 400)
    tok = train_tokenizer(TEXTS, tok_cfg)
    tok_file = tmp_path / "tokenizer.json"
    tok.save(str(tok_file))
    ids = special_ids(tok, tok_cfg)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=tok.get_vocab_size(),
                      pad_vocab_to_multiple_of=8)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if doctor is not None:
        doctor(model, ids)
    out = export_to_hf(model.state_dict(), cfg, tmp_path / "hf", tokenizer_json=tok_file, special_ids=ids)
    return out, ids


def test_gpt_export_declares_its_special_tokens_everywhere(tmp_path):
    out, ids = _export(tmp_path, "gpt")
    eod = ids["eod"]
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (eod, eod, eod)
    assert tok.eos_token == "<|endoftext|>"
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (eod, eod, eod)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eod and gen["pad_token_id"] == eod
    batch = tok(["the fox", "the quick brown fox jumps"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and (batch["input_ids"] == eod).any()
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["attention_mask"].sum(1).tolist()[1]


def test_gpt_export_runs_the_text_generation_pipeline(tmp_path):
    out, _ = _export(tmp_path, "gpt")
    model = AutoModelForCausalLM.from_pretrained(out)
    generate = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(out))
    result = generate("the quick brown", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("the quick brown")


def _always_eos(model, ids):
    """Make end-of-document the argmax after every context: a constant final hidden state that
    points along a large eod embedding row."""
    with torch.no_grad():
        v = torch.zeros_like(model.tok_emb.weight[0])
        v[0] = 100.0
        model.tok_emb.weight[ids["eod"]] = v
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(v)


def test_generation_stops_at_the_exported_eos(tmp_path):
    out, ids = _export(tmp_path, "gpt", doctor=_always_eos)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tok("the quick brown", return_tensors="pt")
    new = model.generate(**prompt, max_new_tokens=10, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert new.tolist() == [ids["eod"]]  # one token, the eos, and then it stopped (not 10)


def test_bert_export_runs_fill_mask_and_wraps_sequences_in_cls_sep(tmp_path):
    out, ids = _export(tmp_path, "bert")
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token, tok.unk_token) == \
        ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")
    enc = tok("the quick brown fox")["input_ids"]
    assert enc[0] == ids["cls"] and enc[-1] == ids["sep"]
    pair = tok("the fox", "the dog")
    assert pair["input_ids"].count(ids["sep"]) == 2 and set(pair["token_type_ids"]) == {0, 1}
    batch = tok(["the fox", "the quick brown fox jumps"], padding=True)
    assert batch["input_ids"][0][-1] == ids["pad"]
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(out), tokenizer=tok)
    guesses = fill(f"the quick {tok.mask_token} fox", top_k=3)
    assert len(guesses) == 3 and all(g["sequence"] for g in guesses)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == ids["pad"]
