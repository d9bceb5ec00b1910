"""GPT: a causal language model (the GPT-2 design; with the config's options, a Llama-style decoder).

GPT-2 adds learned position embeddings to the tokens; ``position: rope`` instead rotates queries
and keys (Llama). Parameter names are ours; ``hf.py`` maps them to and from
``transformers.GPT2LMHeadModel`` and ``hf_modern.py`` to and from ``LlamaForCausalLM``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.models.attention_masks import build_mask, positions
from pipeline.models.layers import RotaryEmbedding, init_weights, make_block, make_norm, scale_residual_init


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.d_model)
        learned = cfg.position == "learned"
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.rotary = None if learned else RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab, bias=False)
        self.apply(lambda m: init_weights(m, cfg.init_std))
        scale_residual_init(self.blocks, cfg.init_std)
        if cfg.tie_embeddings:
            # One Parameter under two names; state_dict lists it twice (see state_dict_for_save).
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or with ``labels`` the mean cross-entropy.

        ``labels[b, t]`` is the target for position t (already shifted by the loader); -100 is ignored.
        ``doc_ids`` (B, T): the documents packed into each row (a new document wherever the id
        changes); each then sees only itself, with positions from 0, as if it were alone.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        pos = positions(doc_ids, T, input_ids.device)  # (1 or B, T)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)  # (B, T, C)
        x = self.drop(x)
        mask = build_mask(causal=True, seq_len=T, device=input_ids.device, doc_ids=doc_ids,
                              kernel=self.cfg.attention_kernel)
        rope = None if self.rotary is None else self.rotary(pos)
        recompute = self.cfg.activation_checkpointing and self.training
        for block in self.blocks:
            x = checkpoint(block, x, mask, rope, use_reentrant=False) if recompute else block(x, mask, rope)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if labels is None:
            return logits
        # float(): the softmax over a large vocabulary loses too much precision in bf16
        return F.cross_entropy(logits.float().view(B * T, -1), labels.reshape(B * T), ignore_index=-100)
