"""GPT and BERT modules: the promises the trainer and evaluator rely on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.models import build_model, load_state_dict_tied, state_dict_for_save
from pipeline.models.layers import PostNormBlock, PreNormBlock

pytestmark = pytest.mark.unit


def tiny(arch: str, **overrides) -> ModelConfig:
    fields = dict(arch=arch, n_layer=2, n_head=2, d_model=32, max_seq_len=32, vocab_size=50)
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_forward_returns_padded_vocab_logits_or_scalar_loss(arch):
    torch.manual_seed(0)
    model = build_model(tiny(arch, pad_vocab_to_multiple_of=64))
    ids = torch.randint(0, 50, (3, 16))
    assert model(ids).shape == (3, 16, 64)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    loss = model(ids, labels)
    assert loss.shape == () and torch.isfinite(loss)


def test_build_model_refuses_unresolved_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(tiny("gpt", vocab_size=None))


def test_gpt_loss_is_cross_entropy_of_its_logits_ignoring_minus_100():
    torch.manual_seed(0)
    model = build_model(tiny("gpt")).eval()
    ids = torch.randint(0, 50, (2, 12))
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :5] = -100
    logits = model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels), expected)


def test_gpt_is_causal_a_future_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = build_model(tiny("gpt")).eval()
    ids = torch.randint(0, 50, (1, 20))
    base = model(ids)
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 50
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_bert_is_bidirectional_a_later_token_changes_earlier_outputs():
    torch.manual_seed(0)
    model = build_model(tiny("bert")).eval()
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 50
    assert not torch.allclose(model(ids)[:, 0], model(changed)[:, 0])


def test_bert_padding_is_invisible_to_real_tokens():
    torch.manual_seed(0)
    model = build_model(tiny("bert")).eval()
    ids = torch.randint(0, 50, (1, 10))
    padded = torch.cat([ids, torch.randint(0, 50, (1, 6))], dim=1)  # 6 junk tokens after
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, :10], model(ids), atol=1e-5, rtol=0)


def test_bert_sparse_head_loss_equals_dense_loss_over_masked_positions():
    torch.manual_seed(0)
    model = build_model(tiny("bert")).eval()
    ids = torch.randint(0, 50, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 8], labels[1, 15] = 7, 9, 11
    logits = model(ids)  # (B, T, V) everywhere
    dense = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels), dense)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_tied_embedding_is_one_parameter(arch):
    model = build_model(tiny(arch))
    head = model.lm_head if arch == "gpt" else model.mlm_head.decoder
    assert head.weight is model.tok_emb.weight
    untied = build_model(tiny(arch, tie_embeddings=False))
    head = untied.lm_head if arch == "gpt" else untied.mlm_head.decoder
    assert head.weight is not untied.tok_emb.weight


def test_gpt_residual_projections_get_depth_scaled_init():
    torch.manual_seed(0)
    cfg = tiny("gpt", n_layer=8, d_model=256)
    model = build_model(cfg)
    scaled = torch.cat([b.attn.out_proj.weight.flatten() for b in model.blocks]).std().item()
    plain = torch.cat([b.attn.q_proj.weight.flatten() for b in model.blocks]).std().item()
    assert scaled == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert plain == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_weights_survive_safetensors_without_the_tied_alias(arch, tmp_path):
    torch.manual_seed(0)
    cfg = tiny(arch)
    model = build_model(cfg)
    sd = state_dict_for_save(model)
    assert "tok_emb.weight" in sd and not {"lm_head.weight", "mlm_head.decoder.weight"} & set(sd)
    save_file(sd, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = build_model(cfg)
    load_state_dict_tied(fresh, load_file(tmp_path / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    head = fresh.lm_head if arch == "gpt" else fresh.mlm_head.decoder
    assert head.weight is fresh.tok_emb.weight  # still tied after loading


def test_loading_weights_of_another_config_names_the_mismatch():
    sd = state_dict_for_save(build_model(tiny("gpt", n_layer=3)))
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.2\."):
        load_state_dict_tied(build_model(tiny("gpt", n_layer=2)), sd)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_activation_checkpointing_gives_the_same_loss_and_grads(arch):
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, ::2] = -100
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)  # same init and the same dropout masks in both runs
        model = build_model(tiny(arch, dropout=0.1, attn_dropout=0.1, activation_checkpointing=recompute))
        model.train()
        torch.manual_seed(1)
        loss = model(ids, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_blocks_compile_as_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)  # (B, T, C)
    pre = PreNormBlock(32, 2, 64, dropout=0.0, attn_dropout=0.0, eps=1e-5)
    torch.testing.assert_close(torch.compile(pre, fullgraph=True)(x), pre(x), atol=1e-5, rtol=1e-5)
    post = PostNormBlock(32, 2, 64, dropout=0.0, attn_dropout=0.0, eps=1e-12)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)  # (B, 1, 1, T)
    mask[1, ..., 5:] = False
    compiled = torch.compile(post, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), post(x, mask), atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_positions_is_refused_with_the_field_name():
    model = build_model(tiny("gpt", max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
