"""Export to, and import from, the Hugging Face `transformers` layout.

GPT ↔ ``GPT2LMHeadModel`` and BERT ↔ ``BertForMaskedLM``: a ``config.json`` plus a
``model.safetensors`` that ``from_pretrained(out_dir)`` loads as-is. Only data moves (renames,
transposes, splitting/joining GPT-2's fused qkv), so import → export is bit-identical. Weights are read
with the safetensors library only, never with pickle-based ``torch.load``. ``transformers`` itself
is not needed here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.models import hf_modern

# (ours, HF, transpose) for one block. GPT-2 stores Linear weights as Conv1D, i.e. (in, out).
_GPT_BLOCK = [
    ("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
    ("attn.out_proj.weight", "attn.c_proj.weight", True), ("attn.out_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc_in.weight", "mlp.c_fc.weight", True), ("mlp.fc_in.bias", "mlp.c_fc.bias", False),
    ("mlp.fc_out.weight", "mlp.c_proj.weight", True), ("mlp.fc_out.bias", "mlp.c_proj.bias", False),
]
_BERT_BLOCK = [
    ("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
    ("attn.v_proj", "attention.self.value"), ("attn.out_proj", "attention.output.dense"),
    ("ln_1", "attention.output.LayerNorm"), ("mlp.fc_in", "intermediate.dense"),
    ("mlp.fc_out", "output.dense"), ("ln_2", "output.LayerNorm"),
]
_BERT_TOP = [
    ("tok_emb.weight", "bert.embeddings.word_embeddings.weight"),
    ("pos_emb.weight", "bert.embeddings.position_embeddings.weight"),
    ("type_emb.weight", "bert.embeddings.token_type_embeddings.weight"),
    ("emb_ln.weight", "bert.embeddings.LayerNorm.weight"), ("emb_ln.bias", "bert.embeddings.LayerNorm.bias"),
    ("mlm_head.dense.weight", "cls.predictions.transform.dense.weight"),
    ("mlm_head.dense.bias", "cls.predictions.transform.dense.bias"),
    ("mlm_head.ln.weight", "cls.predictions.transform.LayerNorm.weight"),
    ("mlm_head.ln.bias", "cls.predictions.transform.LayerNorm.bias"),
]
_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def _gpt_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """(ours, HF, transpose) for every GPT tensor except the fused qkv."""
    yield "tok_emb.weight", "transformer.wte.weight", False
    yield "pos_emb.weight", "transformer.wpe.weight", False
    for i in range(cfg.n_layer):
        for ours, theirs, t in _GPT_BLOCK:
            yield f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", t
    yield "ln_f.weight", "transformer.ln_f.weight", False
    yield "ln_f.bias", "transformer.ln_f.bias", False
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight", False


def _bert_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(ours, HF) for every BERT tensor except the output bias and untied decoder."""
    yield from _BERT_TOP
    for i in range(cfg.n_layer):
        for ours, theirs in _BERT_BLOCK:
            for p in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{p}", f"bert.encoder.layer.{i}.{theirs}.{p}"


def _take(sd: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in sd:
        raise ValueError(f"{where}: tensor {name!r} is missing; is this a checkpoint of this model config?")
    return sd[name]


# --------------------------------------------------------------------------------------- export


def _gpt_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs, t in _gpt_pairs(cfg):
        x = _take(sd, ours, "export")
        out[theirs] = x.t() if t else x
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        w = torch.cat([_take(sd, b + n + ".weight", "export") for n in _QKV], dim=0)  # (3C, C)
        out[f"transformer.h.{i}.attn.c_attn.weight"] = w.t()  # (C, 3C): Conv1D is (in, out)
        bias = torch.cat([_take(sd, b + n + ".bias", "export") for n in _QKV])  # (3C,)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = bias
    return out


def _bert_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {theirs: _take(sd, ours, "export") for ours, theirs in _bert_pairs(cfg)}
    bias = _take(sd, "mlm_head.decoder.bias", "export")
    out["cls.predictions.bias"] = bias  # with tying, HF's decoder.bias is this same Parameter
    if not cfg.tie_embeddings:
        out["cls.predictions.decoder.weight"] = _take(sd, "mlm_head.decoder.weight", "export")
        out["cls.predictions.decoder.bias"] = bias.clone()
    return out


def hf_config(cfg: ModelConfig, token_ids: dict[str, int] | None = None) -> dict:
    """The ``config.json`` contents transformers needs to rebuild this architecture; ``token_ids``
    (see `hf_token_ids`) declares bos/eos/pad so generation stops and batches pad."""
    if hf_modern.hf_family(cfg) in hf_modern.MODEL_TYPES:  # Llama- and ModernBERT-style models
        return hf_modern.hf_config_for(cfg, token_ids)
    ids = token_ids or {}
    if cfg.arch == "gpt":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.padded_vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.attn_dropout, "layer_norm_epsilon": cfg.layer_norm_eps,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
            # GPT2Config defaults these to 50256, which is out of range for our own tokenizers
            "bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids.get("eos_token_id"),
            "pad_token_id": ids.get("pad_token_id"), "torch_dtype": "float32",
        }
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.padded_vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "position_embedding_type": "absolute",
        "pad_token_id": ids.get("pad_token_id"), "torch_dtype": "float32",
    }


# What each HF special-token role is in our tokenizers: GPT's byte-level BPE has one special token,
# the end-of-document one, which serves as bos, eos, unk and pad (as GPT-2's <|endoftext|> does);
# BERT's WordPiece has its five.
_ROLES = {
    "gpt": {"bos_token": "eod", "eos_token": "eod", "unk_token": "eod", "pad_token": "eod"},
    "bert": {"cls_token": "cls", "sep_token": "sep", "mask_token": "mask", "pad_token": "pad", "unk_token": "unk"},
}


def special_tokens(arch: str, tokenizer, special_ids: dict[str, int]) -> dict[str, str]:
    """HF role (``eos_token``, ``mask_token``, …) → token text, from the dataset's special ids."""
    out = {}
    for role, ours in _ROLES[arch].items():
        if ours not in special_ids:
            raise ValueError(f"export: the tokenizer has no {ours!r} special token (needed as {role})")
        out[role] = tokenizer.id_to_token(special_ids[ours])
    return out


def hf_token_ids(arch: str, special_ids: dict[str, int]) -> dict[str, int]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` for config.json and generation_config.json."""
    roles = {f"{role}_id": special_ids[ours] for role, ours in _ROLES[arch].items()}
    keep = ("bos_token_id", "eos_token_id", "pad_token_id") if arch == "gpt" else ("pad_token_id",)
    return {k: roles[k] for k in keep}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _export_tokenizer(out: Path, tokenizer_json: Path, model_cfg: ModelConfig,
                      special_ids: dict[str, int] | None) -> None:
    """tokenizer.json (BERT: with the [CLS] … [SEP] post-processor), tokenizer_config.json and
    special_tokens_map.json declaring every special token, as ``save_pretrained`` writes them
    (without ``special_ids``: a tokenizer that is not one of ours, copied as it is)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_json))
    names = special_tokens(model_cfg.arch, tok, special_ids) if special_ids is not None else {}
    if model_cfg.arch == "bert" and names:  # what BertTokenizerFast adds around every sequence (and pair)
        cls, sep = names["cls_token"], names["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, special_ids["cls"]), (sep, special_ids["sep"])])
    tok.save(str(out / "tokenizer.json"))
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if model_cfg.arch == "bert" else \
        ["input_ids", "attention_mask"]
    # the generic fast tokenizer reads tokenizer.json as it is, whatever the model type
    _write_json(out / "tokenizer_config.json", {"model_input_names": inputs,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_cfg.max_seq_len,
        "clean_up_tokenization_spaces": False, "padding_side": "right" if model_cfg.arch == "bert" else "left",
        **names})
    if names:
        _write_json(out / "special_tokens_map.json", names)


def export_to_hf(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_json: Path | None = None,
    special_ids: dict[str, int] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer files) for transformers.

    ``state_dict`` uses our names (tied aliases may be present or not), as saved by training.
    ``special_ids`` (the dataset manifest's, e.g. ``{"eod": 0}`` or BERT's five) declares the special
    tokens in the tokenizer and the model config, so pipelines, padding and generation work.
    """
    if model_cfg.vocab_size is None:
        raise ValueError("export: model.vocab_size is not set; use the resolved config of the checkpoint")
    modern = hf_modern.hf_family(model_cfg) in hf_modern.MODEL_TYPES
    to_hf = hf_modern.export_state if modern else _gpt_to_hf if model_cfg.arch == "gpt" else _bert_to_hf
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hf(state_dict, model_cfg).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    token_ids = hf_token_ids(model_cfg.arch, special_ids) if special_ids else None
    _write_json(out / "config.json", hf_config(model_cfg, token_ids))
    if token_ids and model_cfg.arch == "gpt":
        _write_json(out / "generation_config.json", {**token_ids, "max_length": model_cfg.max_seq_len})
    if tokenizer_json is not None:
        _export_tokenizer(out, Path(tokenizer_json), model_cfg, special_ids)
    return out


# --------------------------------------------------------------------------------------- import


def _require(hf: dict, key: str, allowed: tuple, path: Path) -> None:
    if hf.get(key, allowed[0]) not in allowed:
        raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (expected one of {allowed})")


def _config_from_hf(hf: dict, path: Path) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "gpt2":
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), path)
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            _require(hf, key, (False,), path)
        _require(hf, "scale_attn_weights", (True,), path)
        return ModelConfig(
            arch="gpt", n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
            d_ff=hf.get("n_inner"), max_seq_len=hf["n_positions"], vocab_size=hf["vocab_size"],
            pad_vocab_to_multiple_of=1, dropout=hf.get("resid_pdrop", 0.1),
            attn_dropout=hf.get("attn_pdrop", 0.1), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            init_std=hf.get("initializer_range", 0.02), tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    if kind == "bert":
        _require(hf, "hidden_act", ("gelu",), path)
        _require(hf, "position_embedding_type", ("absolute",), path)
        _require(hf, "is_decoder", (False,), path)
        return ModelConfig(
            arch="bert", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
            pad_vocab_to_multiple_of=1, type_vocab_size=hf.get("type_vocab_size", 2),
            dropout=hf.get("hidden_dropout_prob", 0.1),
            attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    raise ValueError(f"{path}: model_type {kind!r} is not supported (expected gpt2, bert, llama or modernbert)")


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(hf_dir / shard)).items()}
    raise ValueError(f"{hf_dir}: no model.safetensors (pickled pytorch_model.bin is not read, by design)")


def _with_prefix(sd: dict[str, torch.Tensor], prefix: str, head: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Hub checkpoints sometimes store the base model without its prefix (``wte.weight``)."""
    return {k if k.startswith(prefix) or k.startswith(head) else prefix + k: v for k, v in sd.items()}


def _gpt_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    sd = _with_prefix(sd, "transformer.", ("lm_head.",))
    out = {ours: (_take(sd, theirs, str(path)).t() if t else _take(sd, theirs, str(path)))
           for ours, theirs, t in _gpt_pairs(cfg)}
    for i in range(cfg.n_layer):
        w = _take(sd, f"transformer.h.{i}.attn.c_attn.weight", str(path)).t()  # (3C, C)
        b = _take(sd, f"transformer.h.{i}.attn.c_attn.bias", str(path))  # (3C,)
        for name, wi, bi in zip(_QKV, w.chunk(3, dim=0), b.chunk(3)):
            out[f"blocks.{i}.{name}.weight"], out[f"blocks.{i}.{name}.bias"] = wi, bi
    return out


def _bert_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    sd = _with_prefix(sd, "bert.", ("cls.",))
    out = {ours: _take(sd, theirs, str(path)) for ours, theirs in _bert_pairs(cfg)}
    bias = sd.get("cls.predictions.decoder.bias", sd.get("cls.predictions.bias"))
    if bias is None:
        raise ValueError(f"{path}: no MLM head (cls.predictions.bias); export a BertForMaskedLM")
    out["mlm_head.decoder.bias"] = bias
    if not cfg.tie_embeddings:
        out["mlm_head.decoder.weight"] = _take(sd, "cls.predictions.decoder.weight", str(path))
    return out


def import_from_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers GPT-2 / BERT directory as (our config, our state dict without aliases).

    Load the result with ``load_state_dict_tied(build_model(cfg), sd)``. Tensors we do not model
    (BERT's pooler and next-sentence head) are dropped.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{hf_dir}: no config.json; expected a transformers model directory")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") in hf_modern.MODEL_TYPES:
        cfg, sd = hf_modern.import_state(_read_safetensors(hf_dir), hf, str(config_path))
        return cfg, {k: v.contiguous() for k, v in sd.items()}
    cfg = _config_from_hf(hf, config_path)
    sd = _read_safetensors(hf_dir)
    from_hf = _gpt_from_hf if cfg.arch == "gpt" else _bert_from_hf
    return cfg, {k: v.contiguous() for k, v in from_hf(sd, cfg, hf_dir).items()}
