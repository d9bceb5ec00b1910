"""`pretrain plan`'s activation estimate for every model option, against what autograd really keeps.

The measurement counts the distinct storages the saved-tensor hooks see during a forward pass
(parameters left out), for a model of L and of 2·L blocks: the difference is what one block (or
one period of ModernBERT's local/global pattern) keeps, the part the estimate models per block.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.config import ModelConfig, load_config
from pipeline.models import build_model
from pipeline.plan import activation_bytes, estimate, mask_bytes

pytestmark = pytest.mark.unit

B, T = 4, 96
BASE = dict(n_head=4, d_model=64, max_seq_len=T, vocab_size=64, pad_vocab_to_multiple_of=64, n_layer=1)
OPTIONS = {
    "gpt2": {},
    "bert": dict(arch="bert"),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2, tie_embeddings=False),
    "mqa": dict(position="rope", n_kv_heads=1),
    "geglu": dict(mlp="geglu", d_ff=96),
    "modernbert": dict(arch="bert", norm_placement="pre", position="rope", mlp="geglu", bias=False, type_vocab_size=0,
                       n_layer=3, local_attention_window=16, global_attention_every_n_layers=3),
}


def saved_bytes(model: torch.nn.Module, precision: str, doc_ids: torch.Tensor | None) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(4, 64, (B, T), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    if model.cfg.arch == "bert":
        y[:, ::2] = -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.train()(x, y, doc_ids=doc_ids)
    return sum(seen.values())


def per_block(name: str, precision: str, document_masking: bool) -> tuple[int, int]:
    """(measured, estimated) bytes of n_layer more blocks."""
    cfg = ModelConfig(**{**BASE, **OPTIONS[name]})
    deeper = cfg.model_copy(update={"n_layer": 2 * cfg.n_layer})
    docs = torch.arange(T).div(40, rounding_mode="floor").expand(B, T) if document_masking else None
    measured = saved_bytes(build_model(deeper), precision, docs) - saved_bytes(build_model(cfg), precision, docs)
    estimated = (activation_bytes(deeper, T, B, precision, document_masking)
                 - activation_bytes(cfg, T, B, precision, document_masking))
    return measured, estimated


@pytest.mark.parametrize("document_masking", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_estimate_per_block_is_within_ten_percent_of_what_autograd_keeps(name, document_masking):
    measured, estimated = per_block(name, "fp32", document_masking)
    assert estimated == pytest.approx(measured, rel=0.1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "mqa", "modernbert"])
def test_document_masks_cost_what_sdpa_keeps_of_them(name, precision):
    """With documents every layer gets a (B, 1, T, T) mask, and SDPA keeps an additive copy of it in
    the compute dtype per layer; under GQA the repeated key/value heads are kept as well."""
    on, est_on = per_block(name, precision, True)
    off, est_off = per_block(name, precision, False)
    assert est_on - est_off == pytest.approx(on - off, rel=0.02)


def test_flex_block_masks_and_unmasked_models_have_no_mask_term():
    cfg = ModelConfig(**{**BASE, **OPTIONS["llama"]})
    assert mask_bytes(cfg, 2048, 8, "bf16", document_masking=False) == 0
    assert mask_bytes(cfg.model_copy(update={"attention_kernel": "flex"}), 2048, 8, "bf16", True) == 0
    assert mask_bytes(cfg, 2048, 8, "bf16", True) == 8 * 2048**2 * (1 + 2 * cfg.n_layer)


def test_local_window_alone_keeps_one_broadcast_mask_per_local_layer():
    cfg = ModelConfig(**{**BASE, **OPTIONS["modernbert"]})  # layers 1 and 2 are local
    assert mask_bytes(cfg, T, B, "fp32", document_masking=False) == T * T * (1 + 4 * 2)


def test_grouped_query_attention_saves_less_only_without_a_tensor_mask():
    mha = ModelConfig(**{**BASE, **OPTIONS["mqa"], "n_kv_heads": None})
    mqa = ModelConfig(**{**BASE, **OPTIONS["mqa"]})
    assert activation_bytes(mqa, T, B, "fp32") < activation_bytes(mha, T, B, "fp32")
    assert activation_bytes(mqa, T, B, "fp32", True) == activation_bytes(mha, T, B, "fp32", True)


def test_plan_estimate_counts_the_document_masks_of_the_llama_preset():
    cfg = load_config("configs/models/llama-1b.yaml", ["model.vocab_size=32000", "train.seq_len=2048",
                                                       "train.micro_batch_size_per_gpu=4", "train.global_batch_size=4",
                                                       "train.precision=bf16", "model.max_seq_len=2048"])
    assert cfg.data.document_masking
    plain = cfg.model_copy(update={"data": cfg.data.model_copy(update={"document_masking": False})})
    with_masks, without = estimate(cfg, 1).memory.activations, estimate(plain, 1).memory.activations
    repeated_kv = 4 * 2048 * cfg.model.n_layer * 2 * 2 * (cfg.model.d_model - cfg.model.kv_heads * cfg.model.head_dim)
    assert with_masks - without == mask_bytes(cfg.model, 2048, 4, "bf16", True) + repeated_kv


@pytest.mark.parametrize("name", ["gpt2-small", "bert-base", "llama-tiny", "llama-160m", "llama-1b", "modernbert-tiny",
                                  "modernbert-base"])
def test_flops_and_parameters_of_every_preset_match_the_built_module(name):
    """6 FLOPs per weight of every matmul the module runs (gated MLPs' third matrix, GQA's narrower
    k/v, an untied head) plus the attention term; parameters exactly as built."""
    from pipeline.models.flops import attention_context, param_count, train_flops_per_token

    cfg = load_config(f"configs/models/{name}.yaml", ["model.vocab_size=32000", "train.seq_len=256"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    matmul = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for m in linear)
    attention = 12 * cfg.d_model * sum(attention_context(cfg, i, 256) for i in range(cfg.n_layer))
    # what the 6·N rule adds beyond the linear layers: norm gains and segment embeddings (< 0.5%)
    assert train_flops_per_token(cfg, 256) == pytest.approx(6 * matmul + attention, rel=5e-3)
