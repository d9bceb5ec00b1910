"""Llama-style decoders from the same blocks: each option alone, composed, exact against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import ModelConfig, load_config
from pipeline.models import build_model, load_state_dict_tied, state_dict_for_save
from pipeline.models.flops import param_count, train_flops_per_token
from pipeline.models.hf_modern import export_llama, hf_config_for, hf_family, import_llama, import_state
from pipeline.models.layers import PostNormBlock, PreNormBlock, RotaryEmbedding, apply_rotary, make_block

pytestmark = pytest.mark.unit

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"
LLAMA = dict(arch="gpt", position="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def llama(**overrides) -> ModelConfig:
    fields = dict(**LLAMA, n_layer=2, n_head=4, d_model=32, d_ff=48, max_seq_len=24, vocab_size=61,
                  pad_vocab_to_multiple_of=8, rope_theta=500.0)
    return ModelConfig(**{**fields, **overrides})


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor random (norm gains ≠ 1, biases ≠ 0), so no mapping can hide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(build_model(cfg))


def transformers_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig.from_dict(hf_config_for(cfg))).eval()


VARIANTS = {  # a config with GQA and one without, with the other options flipped too
    "gqa-untied-no-bias": dict(n_kv_heads=2, tie_embeddings=False, bias=False),
    "mha-tied-bias": dict(n_kv_heads=None, tie_embeddings=True, bias=True),
    "mqa": dict(n_kv_heads=1, tie_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_llama_gives_our_logits_in_transformers(variant):
    cfg = llama(**VARIANTS[variant])
    model = ours(cfg)
    hf = transformers_llama(cfg)
    result = hf.load_state_dict(export_llama(model.state_dict(), cfg), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    ids = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_llama_imports_with_the_same_logits(variant):
    cfg = llama(**VARIANTS[variant])
    torch.manual_seed(0)
    hf = perturbed(transformers_llama(cfg))  # transformers' own init, then every tensor moved
    cfg_back, sd = import_llama(hf.state_dict(), hf.config.to_dict())
    assert hf_family(cfg_back) == "llama" and cfg_back.kv_heads == cfg.kv_heads
    model = build_model(cfg_back).eval()
    load_state_dict_tied(model, sd)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_llama_files_load_in_transformers_and_come_back_bit_identical(tmp_path):
    cfg = llama(n_kv_heads=2, tie_embeddings=True)
    model = ours(cfg)
    save_file(export_llama(state_dict_for_save(model), cfg), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_for(cfg)))
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    hf.save_pretrained(tmp_path / "saved")  # transformers' own layout and config.json
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg_back, sd = import_state(load_file(tmp_path / "saved" / "model.safetensors"), config)
    padded = cfg.model_copy(update={"vocab_size": 64, "pad_vocab_to_multiple_of": 1})  # the rows it exports
    assert cfg_back.model_dump() == padded.model_dump()
    for name, tensor in state_dict_for_save(model).items():
        assert torch.equal(sd[name], tensor), name


def test_a_mix_no_transformers_class_has_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match="as llama it would need norm rmsnorm"):
        hf_family(llama(norm="layernorm"))
    with pytest.raises(ValueError, match="as gpt2 it would need bias true"):
        hf_family(ModelConfig(bias=False))
    assert hf_family(ModelConfig()) == "gpt2" and hf_family(llama()) == "llama"


def test_import_refuses_scaled_rope_naming_the_key():
    config = hf_config_for(llama())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        import_llama({}, config)


def test_grouped_query_attention_shares_key_value_heads():
    model = build_model(llama(n_head=4, n_kv_heads=1))  # multi-query
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.v_proj.weight.shape == (8, 32) and attn.q_proj.bias is None


def test_llama_is_causal_a_future_token_never_changes_earlier_logits():
    model = ours(llama(n_kv_heads=2))
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 9, 19):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % 61
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t], base[:, t])


def test_default_parts_are_exactly_the_textbook_blocks():
    for arch, textbook in (("gpt", PreNormBlock), ("bert", PostNormBlock)):
        cfg = ModelConfig(arch=arch, d_model=32, n_head=2, d_ff=48, layer_norm_eps=1e-6)
        built = make_block(cfg, 0)
        reference = textbook(32, 2, 48, dropout=0.0, attn_dropout=0.0, eps=1e-6)
        shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
        assert shapes(built) == shapes(reference)
        kinds = lambda m: [type(sub) for sub in m.modules()][1:]  # noqa: E731 - the parts, not the root
        assert kinds(built) == kinds(reference)
        assert built.mlp.gelu_approximate == reference.mlp.gelu_approximate


def test_gated_mlp_default_width_is_eight_thirds_rounded_up():
    assert llama(d_model=128, d_ff=None, ffn_multiple_of=64).ffn_dim == 384  # 341 → 384
    assert llama(d_model=4096, d_ff=None, ffn_multiple_of=256).ffn_dim == 11008  # Llama 2 7B
    assert ModelConfig(d_model=128).ffn_dim == 512  # GELU keeps 4·d


OPTION_SETS = [
    dict(arch="gpt", position="rope"),
    dict(arch="gpt", norm="rmsnorm"),
    dict(arch="gpt", mlp="swiglu", d_ff=None, ffn_multiple_of=16),
    dict(arch="gpt", mlp="geglu", bias=False),
    dict(arch="gpt", n_kv_heads=1, tie_embeddings=False),
    dict(**LLAMA, n_kv_heads=2, tie_embeddings=False),
    dict(arch="bert", position="rope", mlp="swiglu"),
    dict(arch="bert", norm_placement="pre", norm="rmsnorm", n_kv_heads=2),
    dict(arch="bert", norm_placement="pre", position="rope", mlp="geglu", bias=False, type_vocab_size=0,
         local_attention_window=4, global_attention_every_n_layers=2, local_rope_theta=100.0),
    dict(arch="bert", bias=False, tie_embeddings=False, local_attention_window=6, global_attention_every_n_layers=3),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_composes_and_param_count_matches_the_module(options):
    cfg = ModelConfig(**{**dict(n_layer=3, n_head=4, d_model=32, d_ff=40, max_seq_len=20, vocab_size=37,
                                pad_vocab_to_multiple_of=8), **options})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    embeddings = 40 * 32 * (1 if cfg.tie_embeddings else 2)
    assert param_count(cfg, include_embedding=False, include_position=False) == (
        param_count(cfg, include_position=False) - embeddings)
    ids = torch.randint(0, 37, (2, 12))
    labels = ids.clone()
    labels[:, ::2] = -100
    loss = model(ids, labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_flops_count_gqa_through_parameters_only_and_the_output_projection_once():
    mha, gqa = llama(n_kv_heads=None), llama(n_kv_heads=1)
    kv_saved = 2 * 32 * (32 - 8)  # k and v projections: 4 heads of 8 → 1 head
    assert param_count(mha) - param_count(gqa) == 2 * kv_saved  # two layers
    assert train_flops_per_token(mha, 24) - train_flops_per_token(gqa, 24) == 6 * 2 * kv_saved
    tied, untied = llama(tie_embeddings=True), llama(tie_embeddings=False)
    assert param_count(untied) - param_count(tied) == 64 * 32
    assert train_flops_per_token(untied, 24) == train_flops_per_token(tied, 24)  # a lookup is no matmul
    n = param_count(tied)  # rope: no position table to leave out
    assert train_flops_per_token(tied, 24) == 6 * n + 12 * 2 * 32 * 24


def test_rope_has_no_position_parameters_and_scores_depend_only_on_distance():
    model = build_model(llama())
    assert model.pos_emb is None and not any("pos" in n for n, _ in model.named_parameters())
    rotary = RotaryEmbedding(head_dim=8, theta=500.0)
    q, k = torch.randn(2, 1, 2, 6, 8).unbind(0)  # (1, heads, T, hs) each
    pos = torch.arange(6)[None]  # (1, T)

    def scores(p):
        cos, sin = rotary(p)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)  # (1, h, T, T)

    torch.testing.assert_close(scores(pos + 7), scores(pos), atol=1e-5, rtol=0)  # shifted by 7
    assert not torch.allclose(scores(pos.flip(-1)), scores(pos))


@pytest.mark.parametrize("bad, message", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=36, n_head=4), "even head size"),
    (dict(norm_placement="post"), "post is for bert"),
    (dict(local_attention_window=8, global_attention_every_n_layers=2), "for bert"),
    (dict(attention_kernel="flex", attn_dropout=0.1), "flex"),
])
def test_impossible_options_fail_at_load_naming_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        llama(**bad)


def test_activation_checkpointing_gives_the_same_loss_and_grads_with_rope():
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(llama(n_kv_heads=2, activation_checkpointing=recompute)).train()
        loss = model(ids, ids)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# Published sizes: llama-160m as the widely used draft model, llama-1b as Llama 3.2 1B.
PUBLISHED = {"llama-160m": (162.4e6, 32000), "llama-1b": (1236e6, 128256), "modernbert-base": (149.0e6, 50368)}


def preset(name: str, vocab: int | None = None) -> ModelConfig:
    overrides = [f"model.vocab_size={vocab}", "model.pad_vocab_to_multiple_of=1"] if vocab else []
    return load_config(PRESETS / f"{name}.yaml", overrides).model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_new_presets_have_their_published_size_and_transformers_count(name):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    published, vocab = PUBLISHED[name]
    cfg = preset(name, vocab)
    assert param_count(cfg) == pytest.approx(published, rel=0.01)
    family = hf_family(cfg)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "modernbert": (ModernBertConfig, ModernBertForMaskedLM)}[family]
    with torch.device("meta"):  # no memory, no init time
        reference = model_cls(config_cls.from_dict(hf_config_for(cfg)))
    assert param_count(cfg) == reference.num_parameters()


@pytest.mark.parametrize("name, family", [("llama-tiny", "llama"), ("modernbert-tiny", "modernbert")])
def test_tiny_presets_run_on_cpu_with_the_tokenizers_vocabulary(name, family):
    cfg = preset(name)
    assert cfg.vocab_size is None and hf_family(cfg.model_copy(update={"vocab_size": 100})) == family
    model = build_model(cfg.model_copy(update={"vocab_size": 100})).eval()
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 128)  # 100 padded to 128
