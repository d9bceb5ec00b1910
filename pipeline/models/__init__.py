"""Model families and their weights.

``build_model(cfg)`` is the one entry point the trainer and evaluator use: ``arch`` picks the
objective (gpt: causal LM, bert: masked LM), the other fields pick the parts, so a Llama-style
decoder is a GPT and a ModernBERT-style encoder a BERT. Weights on disk are a ``model.safetensors``
of ``state_dict_for_save(model)``: our parameter names, fp32, each tied tensor once;
``load_state_dict_tied`` puts them back.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised GPT or BERT with the parts ``cfg`` names (``cfg.vocab_size`` must be resolved)."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building")
    if cfg.arch == "gpt":
        from pipeline.models.gpt import GPT

        return GPT(cfg)
    if cfg.arch == "bert":
        from pipeline.models.bert import BERT

        return BERT(cfg)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r} (expected gpt or bert)")


def tied_aliases(model: nn.Module) -> set[str]:
    """Names under which an already-listed Parameter appears again (e.g. ``lm_head.weight``)."""
    unique = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as fp32 CPU tensors, without tied aliases.

    safetensors refuses two names sharing one storage, and the alias carries no information: the
    tie is part of the architecture (``model.tie_embeddings``) and comes back when the model is built.
    """
    aliases = tied_aliases(model)
    out = {}
    for name, t in model.state_dict().items():
        if name in aliases:
            continue
        t = t.detach().to("cpu")
        out[name] = (t.float() if t.is_floating_point() else t).contiguous()
    return out


def load_state_dict_tied(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights saved by ``state_dict_for_save`` (aliases may be present or absent).

    Loading copies into the existing Parameters, so a tied pair stays one Parameter. Missing or
    unexpected names raise one error listing them all.
    """
    aliases = tied_aliases(model)
    expected = set(model.state_dict()) - aliases
    given = set(state_dict) - aliases
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit this model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
            "was the checkpoint written with a different model config?"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in aliases}, strict=False)


def initial_model(cfg: ModelConfig) -> nn.Module:
    """The model training starts from: fresh weights, or ``cfg.init_from``'s transformers weights."""
    model = build_model(cfg)
    if not cfg.init_from:
        return model
    weights = _init_from_weights(cfg)
    ours = {k: v for k, v in model.state_dict().items() if k not in tied_aliases(model)}
    load_state_dict_tied(model, {name: _fit(name, weights.get(name), target, cfg) for name, target in ours.items()})
    return model


def _init_from_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``cfg.init_from``'s tensors under our names, once its config.json agrees with ``cfg``.

    The config loader already filled unset fields from that config.json and refused set ones that
    disagree (hf_fields.py); this checks the same against the importer's own reading of it, so a
    config built another way, or a drift between the two readings, is one error naming both values."""
    from pipeline.hf_fields import agrees, read_hf_fields
    from pipeline.models.hf import import_from_hf
    from pipeline.models.hf_modern import hf_family
    from pipeline.objstore import is_uri
    from pipeline.remote_inputs import local_copy

    hf_dir = local_copy(cfg.init_from, "model.init_from") if is_uri(cfg.init_from) else cfg.init_from
    try:
        hf_cfg, weights = import_from_hf(hf_dir)
        fields = read_hf_fields(hf_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
    try:
        source, target = hf_family(hf_cfg), hf_family(cfg)
    except ValueError as exc:
        raise ConfigError(f"model.init_from: this config has no transformers counterpart: {exc}") from None
    if source != target:
        raise ConfigError(f"model.init_from: {cfg.init_from} is a {source} model, this config trains {target}")
    mine = cfg.model_dump()
    for field in fields:
        ours, theirs = getattr(cfg, field), getattr(hf_cfg, field)
        if not agrees(field, ours, theirs, mine):
            raise ConfigError(f"model.init_from: model.{field} is {ours!r} here, but {cfg.init_from} has "
                              f"{theirs!r}; make model.* match the source model (or leave it unset)")
    return weights


def _fit(name: str, source: torch.Tensor | None, target: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if source is None:
        raise ConfigError(f"model.init_from: {cfg.init_from} has no tensor {name!r}")
    if source.shape == target.shape:
        return source
    if source.shape[1:] == target.shape[1:] and source.shape[0] <= target.shape[0]:
        # a vocabulary padded further here: copy the real rows, keep the fresh padding rows
        padded = target.detach().clone()
        padded[: source.shape[0]] = source
        return padded
    raise ConfigError(
        f"model.init_from: {name} is {tuple(source.shape)} there but {tuple(target.shape)} here; "
        f"make model.* match the source model"
    )
