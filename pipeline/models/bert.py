"""BERT: a bidirectional encoder trained by masked-language modelling (the original post-LN design;
with the config's options, a ModernBERT-style encoder).

ModernBERT differs in parts the config names: pre-norm blocks with a final norm, rotary positions,
GeGLU, no biases, no segment embeddings, and local attention in all but every third layer.
Parameter names are ours; ``hf.py`` maps them to and from ``transformers.BertForMaskedLM`` and
``hf_modern.py`` to and from ``ModernBertForMaskedLM``. There is no pooler and no next-sentence
head: pretraining here is MLM only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.models.attention_masks import build_mask, positions
from pipeline.models.layers import RotaryEmbedding, init_weights, make_block, make_norm, scale_residual_init


class MLMHead(nn.Module):
    """dense → GELU → norm → decoder (weight usually tied to the token embedding; own bias)."""

    def __init__(self, d_model: int, vocab: int, norm: nn.Module, bias: bool = True):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model, bias=bias)
        self.ln = norm
        self.decoder = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.dense(x)))  # (..., C)
        return self.decoder(h)  # (..., V)


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.d_model)
        learned = cfg.position == "learned"
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_ln = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(cfg.n_layer))
        # pre-norm blocks never norm the residual stream: the last one's output needs its own norm
        self.ln_f = make_norm(cfg) if cfg.pre_norm else None
        self.mlm_head = MLMHead(cfg.d_model, vocab, make_norm(cfg), bias=cfg.bias)
        # global and local layers may rotate at different rates (ModernBERT: θ 160k and 10k)
        self.rotary = None if learned else RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        local = not learned and cfg.local_attention_window is not None
        self.rotary_local = RotaryEmbedding(cfg.head_dim, cfg.local_rope_theta or cfg.rope_theta) if local else None
        self.apply(lambda m: init_weights(m, cfg.init_std))
        if cfg.pre_norm:
            scale_residual_init(self.blocks, cfg.init_std)
        if cfg.tie_embeddings:
            # One Parameter under two names; state_dict lists it twice (see state_dict_for_save).
            self.mlm_head.decoder.weight = self.tok_emb.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or with ``labels`` the mean cross-entropy over masked positions.

        ``labels``: (B, T), the original token where the input was masked, -100 elsewhere. The head
        then runs only on those ~15% of positions (the sparse MLM head), which saves most of the
        (T × V) output matmul; a batch without any masked position has no loss (NaN), which
        ``data.masking.mask_tokens`` rules out. ``attention_mask``: (B, T), 1 for real tokens, 0 for
        padding. ``doc_ids`` (B, T): segments packed into each row (a new one wherever the id
        changes); each attends only within itself, with positions from 0, so rows need no padding.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        pos = positions(doc_ids, T, input_ids.device)  # (1 or B, T)
        x = self.drop(self.emb_ln(self._embed(input_ids, pos, token_type_ids)))  # (B, T, C)
        padding = None if attention_mask is None else attention_mask.bool()  # (B, T)
        masks, ropes = self._attention_inputs(T, input_ids.device, doc_ids, padding, pos)
        recompute = self.cfg.activation_checkpointing and self.training
        for i, block in enumerate(self.blocks):
            mask, rope = masks[self.cfg.is_local_layer(i)], ropes[self.cfg.is_local_layer(i)]
            x = checkpoint(block, x, mask, rope, use_reentrant=False) if recompute else block(x, mask, rope)
        if self.ln_f is not None:
            x = self.ln_f(x)  # (B, T, C)
        if labels is None:
            return self.mlm_head(x)  # (B, T, V)
        picked = labels != -100  # (B, T)
        logits = self.mlm_head(x[picked])  # (N, V), N = masked positions
        return F.cross_entropy(logits.float(), labels[picked])

    def _embed(self, input_ids: torch.Tensor, pos: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)  # (B, T, C)
        if self.type_emb is None:
            return x
        if token_type_ids is None:
            return x + self.type_emb.weight[0]  # (B, T, C): every token is segment 0
        return x + self.type_emb(token_type_ids)  # (B, T, C)

    def _attention_inputs(self, T: int, device: torch.device, doc_ids, padding, pos) -> tuple[dict, dict]:
        """Mask and rotary angles, keyed by "is a local layer". Padding keys are hidden from every
        query; with neither padding nor documents the global mask is None, which keeps the
        flash-attention path open."""
        kernel, window = self.cfg.attention_kernel, self.cfg.local_attention_window
        masks = {False: build_mask(causal=False, seq_len=T, device=device, doc_ids=doc_ids,
                                       padding=padding, kernel=kernel)}
        if window is not None:
            masks[True] = build_mask(causal=False, seq_len=T, device=device, doc_ids=doc_ids,
                                         padding=padding, window=window, kernel=kernel)
        if self.rotary is None:
            return masks, {False: None, True: None}
        ropes = {False: self.rotary(pos)}
        if self.rotary_local is not None:
            ropes[True] = self.rotary_local(pos)
        return masks, ropes
