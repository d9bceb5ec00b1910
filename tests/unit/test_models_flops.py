"""Analytic parameter counts and FLOPs, and the size presets in configs/models/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from pipeline.config import ModelConfig, load_config
from pipeline.models import build_model
from pipeline.models.flops import param_count, train_flops_per_token
from pipeline.models.hf import hf_config

pytestmark = pytest.mark.unit

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"
# Published sizes, as rounded in the papers / model cards; the vocabulary is each model's own.
PUBLISHED = {
    "gpt2-small": (124e6, 50257), "gpt2-medium": (350e6, 50257), "gpt2-large": (774e6, 50257),
    "gpt2-xl": (1558e6, 50257), "bert-base": (110e6, 30522), "bert-large": (340e6, 30522),
}


def preset(name: str, vocab_size: int | None = None) -> ModelConfig:
    overrides = []
    if vocab_size is not None:
        overrides = [f"model.vocab_size={vocab_size}", "model.pad_vocab_to_multiple_of=1"]
    return load_config(PRESETS / f"{name}.yaml", overrides).model


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_matches_the_built_module(arch, tie):
    cfg = ModelConfig(arch=arch, n_layer=3, n_head=2, d_model=16, d_ff=40, max_seq_len=20, vocab_size=37,
                      pad_vocab_to_multiple_of=8, type_vocab_size=3, tie_embeddings=tie)
    model = build_model(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert param_count(cfg, include_position=False) == param_count(cfg) - 20 * 16
    embeddings = 40 * 16 * (1 if tie else 2)  # vocab padded 37 -> 40
    assert param_count(cfg, include_position=False, include_embedding=False) == (
        param_count(cfg, include_position=False) - embeddings
    )


@pytest.mark.parametrize("name", ["gpt2-small", "bert-base"])
def test_preset_count_equals_transformers_count_of_the_same_config(name):
    vocab = PUBLISHED[name][1]
    cfg = preset(name, vocab)
    hf = hf_config(cfg)
    gpt = cfg.arch == "gpt"
    config_cls, model_cls = (GPT2Config, GPT2LMHeadModel) if gpt else (BertConfig, BertForMaskedLM)
    with torch.device("meta"):  # no memory, no init time
        reference = model_cls(config_cls.from_dict(hf))
    assert param_count(cfg) == reference.num_parameters()
    assert param_count(cfg) == {"gpt2-small": 124_439_808, "bert-base": 109_514_298}[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_its_published_size(name):
    published, vocab = PUBLISHED[name]
    # The papers round: GPT-2 medium is 354.8M ("345M"/"350M"), BERT-large 335.2M ("340M").
    assert param_count(preset(name, vocab)) == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_tiny_presets_leave_the_vocabulary_to_the_tokenizer(name):
    cfg = preset(name)
    assert cfg.vocab_size is None and cfg.n_layer == 2 and cfg.d_model == 128
    model = build_model(cfg.model_copy(update={"vocab_size": 100})).eval()
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 128)  # 100 padded to 128


def test_gpt2_tiny_is_the_small_cpu_demo_shape():
    cfg = preset("gpt2-tiny")
    assert (cfg.arch, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.max_seq_len) == ("gpt", 2, 128, 2, 256)


def test_train_flops_per_token_is_6n_plus_attention():
    cfg = preset("gpt2-small", 50257)
    n = param_count(cfg, include_position=False)
    assert n == 124_439_808 - 1024 * 768
    assert train_flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024
    # doubling the context adds exactly the attention term again
    assert train_flops_per_token(cfg, 2048) - train_flops_per_token(cfg, 1024) == 12 * 12 * 768 * 1024


def test_padded_vocab_rounds_up_to_the_multiple():
    assert ModelConfig(vocab_size=50257, pad_vocab_to_multiple_of=64).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=50304, pad_vocab_to_multiple_of=64).padded_vocab_size == 50304
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig().padded_vocab_size
