"""`model.init_from` takes the shapes from the transformers config.json: unset fields filled in at
load time, a set one that disagrees refused naming both values, for GPT-2, BERT, Llama and ModernBERT."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, build_config, load_config
from pipeline.hf_fields import read_hf_fields
from pipeline.models import build_model, initial_model, state_dict_for_save
from pipeline.models.hf import export_to_hf, import_from_hf

pytestmark = pytest.mark.unit

FAMILIES = {
    "gpt2": dict(arch="gpt", n_layer=3, n_head=2, d_model=48, d_ff=96, max_seq_len=40, vocab_size=120,
                 layer_norm_eps=1e-6, tie_embeddings=False),
    "bert": dict(arch="bert", n_layer=2, n_head=4, d_model=32, d_ff=72, max_seq_len=48, vocab_size=100,
                 type_vocab_size=3, layer_norm_eps=1e-12),
    "llama": dict(arch="gpt", position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_layer=2, n_head=4,
                  n_kv_heads=2, d_model=32, d_ff=40, max_seq_len=64, vocab_size=90, rope_theta=500_000.0,
                  layer_norm_eps=1e-5, tie_embeddings=False),
    "modernbert": dict(arch="bert", position="rope", norm="layernorm", norm_placement="pre", mlp="geglu", bias=False,
                       type_vocab_size=0, n_layer=4, n_head=2, d_model=32, d_ff=48, max_seq_len=64, vocab_size=96,
                       rope_theta=160_000.0, local_rope_theta=10_000.0, local_attention_window=16,
                       global_attention_every_n_layers=3),
}


def _export(tmp_path, family: str):
    cfg = ModelConfig(pad_vocab_to_multiple_of=1, **FAMILIES[family])
    torch.manual_seed(0)
    out = export_to_hf(state_dict_for_save(build_model(cfg)), cfg, tmp_path / family)
    return cfg, out


def _load(out, *sets: str):
    return load_config(None, [f"model.init_from={out}", "train.seq_len=32", *sets])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_config_json_reading_agrees_with_the_weight_importer(tmp_path, family):
    cfg, out = _export(tmp_path, family)
    fields = read_hf_fields(out)
    imported, _ = import_from_hf(out)
    assert {k: getattr(imported, k) for k in fields} == fields  # the two readings of config.json
    assert {k: getattr(cfg, k) for k in fields} == fields  # and both give back what was exported


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unset_fields_come_from_init_from_and_the_weights_load(tmp_path, family):
    cfg, out = _export(tmp_path, family)
    tokenizer = "wordpiece" if FAMILIES[family]["arch"] == "bert" else "bpe"  # BERT needs [CLS], [MASK]
    loaded = _load(out, "model.pad_vocab_to_multiple_of=1", f"data.tokenizer.type={tokenizer}")
    for field, value in FAMILIES[family].items():
        assert getattr(loaded.model, field) == value, field
    model = initial_model(loaded.model)
    torch.manual_seed(0)  # the seed of the export: the same tensors
    exported = state_dict_for_save(build_model(cfg))
    got = state_dict_for_save(model)
    assert got.keys() == exported.keys() and all(torch.equal(got[k], exported[k]) for k in got)


def test_a_set_value_that_disagrees_names_both_values(tmp_path):
    _, out = _export(tmp_path, "gpt2")
    with pytest.raises(ConfigError) as err:
        _load(out, "model.d_model=64")
    message = str(err.value)
    assert "model.d_model is 64 here" in message and "has 48" in message and "model.init_from" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"model.position is 'rope' here.*'learned'"):
        _load(out, "model.position=rope")


def test_matching_and_null_values_are_accepted_and_the_vocabulary_may_grow(tmp_path):
    _, out = _export(tmp_path, "llama")
    cfg = _load(out, "model.n_layer=2", "model.d_ff=null", "model.vocab_size=128", "model.n_kv_heads=2")
    assert (cfg.model.d_ff, cfg.model.vocab_size, cfg.model.rope_theta) == (40, 128, 500_000.0)
    with pytest.raises(ConfigError, match="model.vocab_size is 64 here"):
        _load(out, "model.vocab_size=64")
    with pytest.raises(ConfigError, match="model.n_kv_heads is 4 here"):
        _load(out, "model.n_kv_heads=4")


def test_a_missing_init_from_fails_at_load_but_a_recorded_config_is_not_resolved_again(tmp_path):
    with pytest.raises(ConfigError, match=r"model.init_from: no .*config.json"):
        load_config(None, [f"model.init_from={tmp_path / 'gone'}"])
    # a checkpoint's config.yaml records the resolved shapes; its init_from may be deleted since
    recorded = build_config({"model": {"init_from": str(tmp_path / "gone"), "n_layer": 5}})
    assert recorded.model.n_layer == 5


def test_initial_model_refuses_a_config_built_past_the_loader_that_disagrees(tmp_path):
    _, out = _export(tmp_path, "llama")
    cfg = ModelConfig(**{**FAMILIES["llama"], "rope_theta": 10_000.0, "init_from": str(out)})
    with pytest.raises(ConfigError, match=r"model.rope_theta is 10000.0 here, but .* has 500000.0"):
        initial_model(cfg)
