"""GPT: a causal language model over learned token + position embeddings (the GPT-2 design).

Parameter names are ours; ``hf.py`` maps them to and from ``transformers.GPT2LMHeadModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.models.layers import PreNormBlock, init_weights, scale_residual_init


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PreNormBlock(cfg.d_model, cfg.n_head, cfg.ffn_dim, cfg.dropout, cfg.attn_dropout,
                         cfg.layer_norm_eps)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab, bias=False)
        self.apply(lambda m: init_weights(m, cfg.init_std))
        scale_residual_init(self.blocks, cfg.init_std)
        if cfg.tie_embeddings:
            # One Parameter under two names; state_dict lists it twice (see state_dict_for_save).
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or with ``labels`` the mean cross-entropy.

        ``labels[b, t]`` is the target for position t (already shifted by the loader); -100 is ignored.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        recompute = self.cfg.activation_checkpointing and self.training
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if labels is None:
            return logits
        # float(): the softmax over a large vocabulary loses too much precision in bf16
        return F.cross_entropy(logits.float().view(B * T, -1), labels.reshape(B * T), ignore_index=-100)
