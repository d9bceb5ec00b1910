"""Export to, and import from, transformers' ``LlamaForCausalLM`` and ``ModernBertForMaskedLM``.

A Llama-style model here is ``arch: gpt`` with ``position: rope``, ``norm: rmsnorm`` and
``mlp: swiglu``; a ModernBERT-style one is ``arch: bert`` with pre-norm blocks, rope, LayerNorm,
GeGLU and no segment embeddings (configs/models/llama-*.yaml, modernbert-*.yaml). ``hf_family``
says which transformers class a config is, and refuses a mix no class has, naming the fields.
Only data moves (renames; splitting or joining the fused GLU input and ModernBERT's fused qkv), so
import → export is bit-identical. ``hf.py`` writes and reads the files; this module maps tensors
and config.json, and never needs ``transformers`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.config import ModelConfig

MODEL_TYPES = ("llama", "modernbert")  # transformers' model_type of the families mapped here

# the fields that make a config one transformers class; anything not named may vary
_FAMILIES = {
    "gpt": {
        "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_heads": None},
        "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
    },
    "bert": {
        "bert": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_heads": None,
                 "norm_placement": "post", "local_attention_window": None, "segments": True},
        "modernbert": {"position": "rope", "norm": "layernorm", "mlp": "geglu", "n_kv_heads": None,
                       "norm_placement": "pre", "segments": False},
    },
}


def _traits(cfg: ModelConfig) -> dict:
    return {
        "position": cfg.position, "norm": cfg.norm, "mlp": cfg.mlp, "bias": cfg.bias,
        "n_kv_heads": None if cfg.kv_heads == cfg.n_head else cfg.n_kv_heads,
        "norm_placement": "pre" if cfg.pre_norm else "post",
        "local_attention_window": cfg.local_attention_window, "segments": cfg.type_vocab_size > 0,
    }


def hf_family(cfg: ModelConfig) -> str:
    """``gpt2``, ``llama``, ``bert`` or ``modernbert``: the transformers class with exactly this
    architecture. A ValueError names the fields that keep the config from the nearest one."""
    traits, misses = _traits(cfg), {}
    for family, wanted in _FAMILIES[cfg.arch].items():
        misses[family] = [f"{k} {_show(v)}" for k, v in wanted.items() if traits[k] != v]
        if not misses[family]:
            return family
    nearest = min(misses, key=lambda f: len(misses[f]))
    wants = ", ".join(m.replace("segments True", "type_vocab_size ≥ 1").replace("segments False", "type_vocab_size 0")
                      for m in misses[nearest])
    raise ValueError(f"model: no transformers class has this architecture; as {nearest} it would need {wants} "
                     f"(export and init_from know GPT-2, Llama, BERT and ModernBERT)")


def _show(value) -> str:
    return "unset" if value is None else str(value).lower()


def _take(sd: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in sd:
        raise ValueError(f"{where}: tensor {name!r} is missing; is this a checkpoint of this model config?")
    return sd[name]


def _expect(cfg: ModelConfig, family: str) -> None:
    if hf_family(cfg) != family:
        raise ValueError(f"model: this config is a {hf_family(cfg)} model, not {family}")


# --------------------------------------------------------------------------------------- llama


def _llama_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(ours, HF) for every Llama tensor except the fused GLU input (fc_in = [gate; up])."""
    yield "tok_emb.weight", "model.embed_tokens.weight"
    linear = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        yield b + "ln_1.weight", h + "input_layernorm.weight"
        yield b + "ln_2.weight", h + "post_attention_layernorm.weight"
        for ours, theirs in (("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                             ("attn.v_proj", "self_attn.v_proj"), ("attn.out_proj", "self_attn.o_proj"),
                             ("mlp.fc_out", "mlp.down_proj")):
            for p in linear:
                yield f"{b}{ours}.{p}", f"{h}{theirs}.{p}"
    yield "ln_f.weight", "model.norm.weight"
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight"


def export_llama(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (tied aliases may be present or not) → ``LlamaForCausalLM``'s tensors."""
    _expect(cfg, "llama")
    out = {theirs: _take(state, ours, "export") for ours, theirs in _llama_pairs(cfg)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            gate, up = _take(state, f"blocks.{i}.mlp.fc_in.{p}", "export").chunk(2, dim=0)  # (d_ff, ...) each
            out[f"model.layers.{i}.mlp.gate_proj.{p}"], out[f"model.layers.{i}.mlp.up_proj.{p}"] = gate, up
    return out


def import_llama(hf_state: dict[str, torch.Tensor], hf_config: dict,
                 where: str = "config.json") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``LlamaForCausalLM``'s tensors and config.json → (our config, our state dict without aliases)."""
    cfg = llama_config(hf_config, where)
    out = {ours: _take(hf_state, theirs, where) for ours, theirs in _llama_pairs(cfg)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            h = f"model.layers.{i}.mlp."
            parts = [_take(hf_state, h + f"{name}.{p}", where) for name in ("gate_proj", "up_proj")]
            out[f"blocks.{i}.mlp.fc_in.{p}"] = torch.cat(parts, dim=0)  # (2·d_ff, ...)
    return cfg, out


def _require(hf: dict, key: str, allowed: tuple, where: str) -> None:
    if hf.get(key, allowed[0]) not in allowed:
        raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (expected one of {allowed})")


def _rope_theta(params: dict | None, legacy: float | None, default: float, where: str) -> float:
    """The base of a default-type RoPE, from ``rope_parameters`` (transformers 5) or the older key."""
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{where}: rope_type {kind!r} (scaled RoPE) is not supported; only the default RoPE")
    return float(params.get("rope_theta", legacy if legacy is not None else default))


def llama_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config for a transformers Llama config.json (one ValueError naming an unsupported key)."""
    _require(hf, "hidden_act", ("silu",), where)
    _require(hf, "rope_scaling", (None,), where)
    _require(hf, "mlp_bias", (hf.get("attention_bias", False),), where)  # one `bias` field here
    heads = hf["num_attention_heads"]
    _require(hf, "head_dim", (hf["hidden_size"] // heads, None), where)
    kv = hf.get("num_key_value_heads") or heads
    params = hf.get("rope_parameters")
    return ModelConfig(
        arch="gpt", position="rope", norm="rmsnorm", mlp="swiglu", bias=hf.get("attention_bias", False),
        n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_heads=None if kv == heads else kv,
        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"], pad_vocab_to_multiple_of=1, dropout=0.0,
        attn_dropout=hf.get("attention_dropout", 0.0), layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02), tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=_rope_theta(params, hf.get("rope_theta"), 10_000.0, where),
    )


def _llama_hf_config(cfg: ModelConfig, ids: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.layer_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        # rope_parameters for transformers 5, rope_theta for the 4.x releases
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.attn_dropout,
        # LlamaConfig defaults these to 1 and 2, which are other tokens in our own tokenizers
        "bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids.get("eos_token_id"),
        "pad_token_id": ids.get("pad_token_id"), "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------- modernbert


def _modernbert_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(ours, HF) for every ModernBERT tensor except the fused qkv."""
    p = ("weight", "bias") if cfg.bias else ("weight",)  # linear layers and LayerNorms alike
    yield "tok_emb.weight", "model.embeddings.tok_embeddings.weight"
    yield from ((f"emb_ln.{x}", f"model.embeddings.norm.{x}") for x in p)
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names = [("ln_2", "mlp_norm"), ("attn.out_proj", "attn.Wo"), ("mlp.fc_in", "mlp.Wi"), ("mlp.fc_out", "mlp.Wo")]
        if i > 0:  # block 0 reads the normed embeddings directly (its attn_norm is an identity)
            names.append(("ln_1", "attn_norm"))
        yield from ((f"{b}{ours}.{x}", f"{h}{theirs}.{x}") for ours, theirs in names for x in p)
    for ours, theirs in (("ln_f", "model.final_norm"), ("mlm_head.dense", "head.dense"), ("mlm_head.ln", "head.norm")):
        yield from ((f"{ours}.{x}", f"{theirs}.{x}") for x in p)
    yield "mlm_head.decoder.bias", "decoder.bias"
    if not cfg.tie_embeddings:
        yield "mlm_head.decoder.weight", "decoder.weight"


_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def export_modernbert(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (tied aliases may be present or not) → ``ModernBertForMaskedLM``'s tensors."""
    _expect(cfg, "modernbert")
    out = {theirs: _take(state, ours, "export") for ours, theirs in _modernbert_pairs(cfg)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            parts = [_take(state, f"blocks.{i}.{name}.{p}", "export") for name in _QKV]
            out[f"model.layers.{i}.attn.Wqkv.{p}"] = torch.cat(parts, dim=0)  # (3C, ...): q, k, v
    return out


def import_modernbert(hf_state: dict[str, torch.Tensor], hf_config: dict,
                      where: str = "config.json") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``ModernBertForMaskedLM``'s tensors and config.json → (our config, our state dict)."""
    cfg = modernbert_config(hf_config, where)
    out = {ours: _take(hf_state, theirs, where) for ours, theirs in _modernbert_pairs(cfg)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            qkv = _take(hf_state, f"model.layers.{i}.attn.Wqkv.{p}", where).chunk(3, dim=0)
            out.update({f"blocks.{i}.{name}.{p}": t for name, t in zip(_QKV, qkv)})
    return cfg, out


def _global_every(types: list[str], where: str) -> int:
    """n such that exactly layers 0, n, 2n, ... are global (1: all are)."""
    n_layer = len(types)
    for n in range(1, n_layer + 1):
        if types == ["full_attention" if i % n == 0 else "sliding_attention" for i in range(n_layer)]:
            return n
    raise ValueError(f"{where}: layer_types {types} is not 'every n-th layer global, from layer 0'")


def modernbert_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config for a transformers ModernBERT config.json (one ValueError naming an unsupported key)."""
    for key in ("hidden_activation", "classifier_activation"):
        _require(hf, key, ("gelu",), where)
    _require(hf, "decoder_bias", (True,), where)
    bias = hf.get("attention_bias", False)
    for key in ("mlp_bias", "norm_bias", "classifier_bias"):
        _require(hf, key, (bias,), where)  # one `bias` field here
    n_layer = hf["num_hidden_layers"]
    legacy = hf.get("global_attn_every_n_layers", 3)  # the 4.x key, before layer_types
    types = hf.get("layer_types") or ["full_attention" if i % legacy == 0 else "sliding_attention"
                                      for i in range(n_layer)]
    every = _global_every(list(types), where)
    params = hf.get("rope_parameters") or {}
    local = every > 1
    return ModelConfig(
        arch="bert", position="rope", norm="layernorm", norm_placement="pre", mlp="geglu", bias=bias,
        type_vocab_size=0, n_layer=n_layer, n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
        pad_vocab_to_multiple_of=1, dropout=hf.get("embedding_dropout", 0.0),
        attn_dropout=hf.get("attention_dropout", 0.0), layer_norm_eps=hf.get("norm_eps", 1e-5),
        init_std=hf.get("initializer_range", 0.02), tie_embeddings=hf.get("tie_word_embeddings", True),
        rope_theta=_rope_theta(params.get("full_attention"), hf.get("global_rope_theta"), 160_000.0, where),
        local_rope_theta=_rope_theta(params.get("sliding_attention"), hf.get("local_rope_theta"), 10_000.0, where)
        if local else None,
        local_attention_window=hf.get("local_attention", 128) if local else None,
        global_attention_every_n_layers=every,
    )


def _modernbert_hf_config(cfg: ModelConfig, ids: dict) -> dict:
    local_theta = cfg.local_rope_theta or cfg.rope_theta
    types = ["sliding_attention" if cfg.is_local_layer(i) else "full_attention" for i in range(cfg.n_layer)]
    window = {"local_attention": cfg.local_attention_window} if cfg.local_attention_window else {}
    return {
        "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "hidden_activation": "gelu",
        "classifier_activation": "gelu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "norm_eps": cfg.layer_norm_eps, "norm_bias": cfg.bias,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "classifier_bias": cfg.bias, "decoder_bias": True,
        "attention_dropout": cfg.attn_dropout, "embedding_dropout": cfg.dropout, "mlp_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "layer_types": types, **window,
        # rope_parameters and layer_types for transformers 5; the flat keys for the 4.x releases
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "global_rope_theta": cfg.rope_theta, "local_rope_theta": local_theta,
        "global_attn_every_n_layers": cfg.global_attention_every_n_layers,
        # ModernBertConfig defaults these to ids of its own 50k vocabulary
        "pad_token_id": ids.get("pad_token_id"), "bos_token_id": ids.get("cls_token_id"),
        "eos_token_id": ids.get("sep_token_id"), "cls_token_id": ids.get("cls_token_id"),
        "sep_token_id": ids.get("sep_token_id"), "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------- dispatch


def hf_config_for(cfg: ModelConfig, token_ids: dict[str, int] | None = None) -> dict:
    """The ``config.json`` contents for a Llama- or ModernBERT-style config (``token_ids``: the
    ``*_token_id`` keys to declare, as ``hf.hf_token_ids`` gives them)."""
    family = hf_family(cfg)
    if family not in MODEL_TYPES:
        raise ValueError(f"model: a {family} config is mapped by hf.py, not hf_modern.py")
    build = _llama_hf_config if family == "llama" else _modernbert_hf_config
    return build(cfg, token_ids or {})


def export_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → the transformers tensors of this config's family (llama or modernbert)."""
    return (export_llama if hf_family(cfg) == "llama" else export_modernbert)(state, cfg)


def import_state(hf_state: dict[str, torch.Tensor], hf_config: dict,
                 where: str = "config.json") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers Llama / ModernBERT checkpoint → (our config, our state dict), by model_type."""
    kind = hf_config.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {kind!r} is not one of {MODEL_TYPES}")
    return (import_llama if kind == "llama" else import_modernbert)(hf_state, hf_config, where)
