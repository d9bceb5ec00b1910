"""ModernBERT-style encoders from the same blocks: exact against transformers, local layers local."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import ModernBertConfig, ModernBertForMaskedLM

from pipeline.config import ModelConfig
from pipeline.models import build_model, load_state_dict_tied, state_dict_for_save
from pipeline.models.flops import param_count, train_flops_per_token
from pipeline.models.hf_modern import (
    export_modernbert,
    hf_config_for,
    hf_family,
    import_modernbert,
    import_state,
    modernbert_config,
)

pytestmark = pytest.mark.unit

MODERN = dict(arch="bert", norm_placement="pre", position="rope", norm="layernorm", mlp="geglu", bias=False,
              type_vocab_size=0, local_attention_window=8, global_attention_every_n_layers=3,
              rope_theta=1000.0, local_rope_theta=50.0)


def modernbert(**overrides) -> ModelConfig:
    fields = dict(**MODERN, n_layer=4, n_head=4, d_model=32, d_ff=48, max_seq_len=32, vocab_size=61,
                  pad_vocab_to_multiple_of=8)
    return ModelConfig(**{**fields, **overrides})


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norm gains ≠ 1, biases ≠ 0
    return model.eval()


def ours(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(build_model(cfg))


def transformers_modernbert(cfg: ModelConfig) -> ModernBertForMaskedLM:
    config = ModernBertConfig.from_dict(hf_config_for(cfg))
    config._attn_implementation = "eager"  # the reference implementation, on CPU
    return ModernBertForMaskedLM(config).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (3, 32), generator=g)
    mask = torch.ones(3, 32, dtype=torch.long)
    mask[1, 21:], mask[2, 6:] = 0, 0  # padding, longer than the local window in row 2
    return ids, mask


VARIANTS = {
    "local-tied-no-bias": dict(),
    "local-untied-bias": dict(tie_embeddings=False, bias=True),
    "global-only": dict(local_attention_window=None, global_attention_every_n_layers=1, local_rope_theta=None),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_modernbert_gives_our_logits_in_transformers_with_padding(variant):
    cfg = modernbert(**VARIANTS[variant])
    model = ours(cfg)
    hf = transformers_modernbert(cfg)
    result = hf.load_state_dict(export_modernbert(model.state_dict(), cfg), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"decoder.weight"} if cfg.tie_embeddings else set())
    ids, mask = batch()
    with torch.no_grad():
        theirs, mine = hf(ids, attention_mask=mask).logits, model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(theirs[real], mine[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_modernbert_imports_with_the_same_logits(variant):
    cfg = modernbert(**VARIANTS[variant])
    torch.manual_seed(0)
    hf = perturbed(transformers_modernbert(cfg))
    cfg_back, sd = import_modernbert(hf.state_dict(), hf.config.to_dict())
    assert hf_family(cfg_back) == "modernbert"
    assert [cfg_back.is_local_layer(i) for i in range(4)] == [cfg.is_local_layer(i) for i in range(4)]
    model = build_model(cfg_back).eval()
    load_state_dict_tied(model, sd)
    ids, mask = batch()
    with torch.no_grad():
        mine, theirs = model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(mine[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


def test_the_local_window_is_what_transformers_calls_local_attention():
    cfg = modernbert()
    model = ours(cfg)
    wider = transformers_modernbert(cfg.model_copy(update={"local_attention_window": 12}))
    wider.load_state_dict(export_modernbert(model.state_dict(), cfg), strict=False)
    ids, _ = batch()
    with torch.no_grad():
        assert not torch.allclose(wider(ids).logits, model(ids), atol=1e-3)  # the window matters here


def test_modernbert_files_load_in_transformers_and_come_back_bit_identical(tmp_path):
    cfg = modernbert(tie_embeddings=True)
    model = ours(cfg)
    save_file(export_modernbert(state_dict_for_save(model), cfg), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_for(cfg, {"pad_token_id": 0})))
    hf, info = ModernBertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    hf.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg_back, sd = import_state(load_file(tmp_path / "saved" / "model.safetensors"), config)
    padded = cfg.model_copy(update={"vocab_size": 64, "pad_vocab_to_multiple_of": 1})  # the rows it exports
    assert cfg_back.model_dump() == padded.model_dump()
    for name, tensor in state_dict_for_save(model).items():
        assert torch.equal(sd[name], tensor), name


def test_pre_norm_encoder_has_modernberts_shape():
    model = build_model(modernbert())
    assert model.pos_emb is None and model.type_emb is None and model.ln_f is not None
    assert isinstance(model.blocks[0].ln_1, torch.nn.Identity)  # the embedding norm feeds block 0
    assert isinstance(model.blocks[1].ln_1, torch.nn.LayerNorm) and model.blocks[1].ln_1.bias is None
    assert model.mlm_head.decoder.bias is not None and model.mlm_head.dense.bias is None
    assert [modernbert().is_local_layer(i) for i in range(4)] == [False, True, True, False]


def test_modernbert_sparse_head_loss_equals_dense_loss_over_masked_positions():
    model = ours(modernbert())
    ids, _ = batch()
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 8], labels[2, 31] = 7, 9, 11
    with torch.no_grad():
        dense = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
        torch.testing.assert_close(model(ids, labels), dense)


def test_import_refuses_a_pattern_or_activation_it_cannot_build_naming_the_key():
    config = hf_config_for(modernbert())
    with pytest.raises(ValueError, match="layer_types"):
        modernbert_config({**config, "layer_types": ["sliding_attention"] + config["layer_types"][1:]})
    with pytest.raises(ValueError, match="hidden_activation"):
        modernbert_config({**config, "hidden_activation": "silu"})
    with pytest.raises(ValueError, match="norm_bias"):
        modernbert_config({**config, "norm_bias": True})


def test_local_layers_count_only_their_window_in_flops():
    cfg = modernbert(n_layer=6, local_attention_window=8, global_attention_every_n_layers=3)
    global_only = cfg.model_copy(update={"local_attention_window": None, "global_attention_every_n_layers": 1,
                                         "local_rope_theta": None})
    n = param_count(cfg)
    assert n == param_count(global_only)  # a window has no parameters
    assert train_flops_per_token(global_only, 32) == 6 * n + 12 * 32 * 6 * 32
    assert train_flops_per_token(cfg, 32) == 6 * n + 12 * 32 * (2 * 32 + 4 * 9)  # 2 global, 4 local (±4)
    assert train_flops_per_token(cfg, 4) == train_flops_per_token(global_only, 4)  # window ≥ the sequence
