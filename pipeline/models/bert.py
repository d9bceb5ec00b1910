"""BERT: a bidirectional encoder trained by masked-language modelling (the original post-LN design).

Parameter names are ours; ``hf.py`` maps them to and from ``transformers.BertForMaskedLM``. There is
no pooler and no next-sentence head: pretraining here is MLM only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.models.layers import PostNormBlock, init_weights


class MLMHead(nn.Module):
    """dense → GELU → LayerNorm → decoder (weight usually tied to the token embedding; own bias)."""

    def __init__(self, d_model: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.ln = nn.LayerNorm(d_model, eps=eps)
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
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(cfg.d_model, cfg.n_head, cfg.ffn_dim, cfg.dropout, cfg.attn_dropout,
                          cfg.layer_norm_eps)
            for _ in range(cfg.n_layer)
        )
        self.mlm_head = MLMHead(cfg.d_model, vocab, cfg.layer_norm_eps)
        self.apply(lambda m: init_weights(m, cfg.init_std))
        if cfg.tie_embeddings:
            # One Parameter under two names; state_dict lists it twice (see state_dict_for_save).
            self.mlm_head.decoder.weight = self.tok_emb.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or with ``labels`` the mean cross-entropy over masked positions.

        ``labels``: (B, T), the original token where the input was masked, -100 elsewhere. The head
        then runs only on those ~15% of positions (the sparse MLM head), which saves most of the
        (T × V) output matmul; a batch without any masked position has no loss (NaN), which
        ``data.masking.mask_tokens`` rules out. ``attention_mask``: (B, T), 1 for real tokens, 0 for
        padding.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)  # (B, T, C)
        if token_type_ids is None:
            x = x + self.type_emb.weight[0]  # (B, T, C): every token is segment 0
        else:
            x = x + self.type_emb(token_type_ids)  # (B, T, C)
        x = self.drop(self.emb_ln(x))  # (B, T, C)
        # Keys that are padding are hidden from every query; None keeps the flash-attention path open.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        recompute = self.cfg.activation_checkpointing and self.training
        for block in self.blocks:
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
        if labels is None:
            return self.mlm_head(x)  # (B, T, V)
        picked = labels != -100  # (B, T)
        logits = self.mlm_head(x[picked])  # (N, V), N = masked positions
        return F.cross_entropy(logits.float(), labels[picked])
