"""Export to, and import from, the Hugging Face `transformers` layout.

GPT ↔ ``GPT2LMHeadModel`` and BERT ↔ ``BertForMaskedLM``: a ``config.json`` plus a
``model.safetensors`` that ``from_pretrained(out_dir)`` loads as-is. Only data moves (renames,
transposes, splitting/joining GPT-2's fused qkv), so import → export is bit-identical. Weights are read
with the safetensors library only, never with pickle-based ``torch.load``. ``transformers`` itself
is not needed here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig

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


def hf_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` contents transformers needs to rebuild this architecture."""
    if cfg.arch == "gpt":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.padded_vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.attn_dropout, "layer_norm_epsilon": cfg.layer_norm_eps,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
            # GPT2Config defaults these to 50256, which is out of range for our own tokenizers.
            "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
        }
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.padded_vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "position_embedding_type": "absolute",
        "pad_token_id": None, "torch_dtype": "float32",
    }


def export_to_hf(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_json: Path | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) for transformers.

    ``state_dict`` uses our names (tied aliases may be present or not), as saved by training.
    """
    if model_cfg.vocab_size is None:
        raise ValueError("export: model.vocab_size is not set; use the resolved config of the checkpoint")
    to_hf = _gpt_to_hf if model_cfg.arch == "gpt" else _bert_to_hf
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hf(state_dict, model_cfg).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg), indent=2) + "\n", encoding="utf-8")
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        # The generic fast tokenizer reads tokenizer.json as it is, whatever the model type.
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_cfg.max_seq_len}
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
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
    raise ValueError(f"{path}: model_type {kind!r} is not supported (expected gpt2 or bert)")


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
    cfg = _config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), config_path)
    sd = _read_safetensors(hf_dir)
    from_hf = _gpt_from_hf if cfg.arch == "gpt" else _bert_from_hf
    return cfg, {k: v.contiguous() for k, v in from_hf(sd, cfg, hf_dir).items()}
