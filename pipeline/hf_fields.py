"""How a transformers ``config.json`` reads as ``model.*`` fields, for ``model.init_from``.

When a config starts from a transformers directory, config.py fills every field of this table the
config leaves unset (or null) from that directory's config.json, and refuses a set value that
disagrees, naming both, at load time: so the resume check, ``plan``, W&B and every checkpoint's
trainer_state see the shapes that are really trained. Only config.json is read here, never the
weights; models/hf.py and models/hf_modern.py map the tensors when the weights are loaded, and
``models.initial_model`` checks that their reading of config.json agrees with this one
(tests/unit/test_init_from_fields.py holds the two equal for each family).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.objstore import is_uri
from pipeline.remote_inputs import read_object


def _rope_theta(params: dict | None, legacy: float | None, default: float) -> float:
    params = params or {}
    return float(params.get("rope_theta", legacy if legacy is not None else default))


def _gpt2(hf: dict) -> dict[str, Any]:
    return {"arch": "gpt", "position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
            "n_layer": hf["n_layer"], "n_head": hf["n_head"], "d_model": hf["n_embd"], "d_ff": hf.get("n_inner"),
            "max_seq_len": hf["n_positions"], "vocab_size": hf["vocab_size"],
            "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": hf.get("tie_word_embeddings", True)}


def _bert(hf: dict) -> dict[str, Any]:
    return {"arch": "bert", "position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
            "n_layer": hf["num_hidden_layers"], "n_head": hf["num_attention_heads"], "d_model": hf["hidden_size"],
            "d_ff": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
            "vocab_size": hf["vocab_size"], "type_vocab_size": hf.get("type_vocab_size", 2),
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-12), "tie_embeddings": hf.get("tie_word_embeddings", True)}


def _llama(hf: dict) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    return {"arch": "gpt", "position": "rope", "norm": "rmsnorm", "mlp": "swiglu",
            "bias": hf.get("attention_bias", False), "n_layer": hf["num_hidden_layers"], "n_head": heads,
            "n_kv_heads": None if kv == heads else kv, "d_model": hf["hidden_size"], "d_ff": hf["intermediate_size"],
            "max_seq_len": hf["max_position_embeddings"], "vocab_size": hf["vocab_size"],
            "layer_norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": hf.get("tie_word_embeddings", False),
            "rope_theta": _rope_theta(hf.get("rope_parameters"), hf.get("rope_theta"), 10_000.0)}


def _global_every(hf: dict) -> int:
    """n such that layers 0, n, 2n, ... are global (from layer_types, or the 4.x key)."""
    types = hf.get("layer_types")
    if not types:
        return hf.get("global_attn_every_n_layers", 3)
    for n in range(1, len(types) + 1):
        if list(types) == ["full_attention" if i % n == 0 else "sliding_attention" for i in range(len(types))]:
            return n
    raise ValueError(f"layer_types {types} is not 'every n-th layer global, from layer 0'")


def _modernbert(hf: dict) -> dict[str, Any]:
    every = _global_every(hf)
    params = hf.get("rope_parameters") or {}
    local = every > 1
    return {"arch": "bert", "position": "rope", "norm": "layernorm", "norm_placement": "pre", "mlp": "geglu",
            "bias": hf.get("attention_bias", False), "type_vocab_size": 0, "n_layer": hf["num_hidden_layers"],
            "n_head": hf["num_attention_heads"], "d_model": hf["hidden_size"], "d_ff": hf["intermediate_size"],
            "max_seq_len": hf["max_position_embeddings"], "vocab_size": hf["vocab_size"],
            "layer_norm_eps": hf.get("norm_eps", 1e-5), "tie_embeddings": hf.get("tie_word_embeddings", True),
            "rope_theta": _rope_theta(params.get("full_attention"), hf.get("global_rope_theta"), 160_000.0),
            "local_rope_theta": _rope_theta(params.get("sliding_attention"), hf.get("local_rope_theta"), 10_000.0)
            if local else None,
            "local_attention_window": hf.get("local_attention", 128) if local else None,
            "global_attention_every_n_layers": every}


_READERS = {"gpt2": _gpt2, "bert": _bert, "llama": _llama, "modernbert": _modernbert}


def _config_json(hf_dir: str | Path) -> tuple[str | Path, bytes | None]:
    """``hf_dir``'s config.json (its name, its bytes or None): a local file, or for a URI the one
    object, read without downloading the directory (its weights come when they are loaded)."""
    if is_uri(hf_dir):
        uri = f"{str(hf_dir).rstrip('/')}/config.json"
        return uri, read_object(uri, "model.init_from")
    path = Path(hf_dir) / "config.json"
    return path, path.read_bytes() if path.is_file() else None


def read_hf_fields(hf_dir: str | Path) -> dict[str, Any]:
    """``model.*`` field → value, from ``hf_dir/config.json``. ValueError names what is wrong."""
    path, raw = _config_json(hf_dir)
    if raw is None:
        raise ValueError(f"model.init_from: no {path} (expected a transformers model directory, e.g. one "
                         f"written by `pretrain export`)")
    try:
        hf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.init_from: {path} is not valid JSON ({exc})") from None
    reader = _READERS.get(hf.get("model_type") if isinstance(hf, dict) else None)
    if reader is None:
        raise ValueError(f"model.init_from: {path}: model_type {hf.get('model_type') if isinstance(hf, dict) else hf!r} "
                         f"is not supported (expected one of {sorted(_READERS)})")
    try:
        return reader(hf)
    except KeyError as exc:
        raise ValueError(f"model.init_from: {path} has no {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ValueError(f"model.init_from: {path}: {exc}") from None


def _padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def agrees(field: str, ours, theirs, model: dict) -> bool:
    """Whether a value set in the config fits the one config.json implies. The vocabulary may grow
    (the importer copies the source rows and keeps fresh ones after them); an unset d_ff or
    n_kv_heads means its default, which the tensor shapes check when the weights load."""
    if field == "vocab_size":
        return _padded(int(ours), int(model.get("pad_vocab_to_multiple_of") or 64)) >= int(theirs)
    if field == "d_ff" and (ours is None or theirs is None):
        return True
    if field == "n_kv_heads":
        heads = model.get("n_head")
        return (ours or heads) == (theirs or heads)
    if isinstance(ours, float) or isinstance(theirs, float):
        return ours is not None and theirs is not None and math.isclose(float(ours), float(theirs), rel_tol=1e-9)
    return ours == theirs


def fill_from_hf(model: dict) -> dict:
    """The raw ``model`` section with the fields of ``model["init_from"]``'s config.json filled in
    where unset or null; a ValueError names the first set field that disagrees, with both values."""
    theirs = read_hf_fields(model["init_from"])
    out = dict(model)
    for field, value in theirs.items():
        if out.get(field) is None:
            out[field] = value
    for field, value in theirs.items():
        ours = out[field]
        if not agrees(field, ours, value, out):
            raise ValueError(f"model.{field} is {ours!r} here, but model.init_from {model['init_from']} has "
                             f"{value!r} (its config.json); leave model.{field} unset to take it from there")
    return out
