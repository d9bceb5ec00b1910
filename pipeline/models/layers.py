"""The Transformer pieces shared by GPT and BERT.

Reads top-down: attention → feed-forward → the two block layouts (pre-LN for GPT, post-LN for BERT)
→ initialisation. Single-device PyTorch only: this package never imports torch.distributed,
deepspeed or ray; the training engine wraps these modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention: Q/K/V projections, softmax(q·kᵀ/√hs)·v, output projection."""

    def __init__(self, d_model: int, n_head: int, attn_dropout: float, resid_dropout: float, causal: bool):
        super().__init__()
        self.n_head, self.causal, self.attn_dropout = n_head, causal, attn_dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: bool, broadcastable to (B, nh, T, T), True where a query may look."""
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # One fused kernel (flash / memory-efficient attention on GPU) instead of materialising the
        # (T, T) score matrix in Python.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.out_proj(y))  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise feed-forward network: expand to d_ff, GELU, project back."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, gelu_approximate: str):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff)
        self.fc_out = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        # GPT-2 was trained with the tanh approximation ("gelu_new"), BERT with the exact erf GELU;
        # matching each keeps exported checkpoints numerically identical in transformers.
        self.gelu_approximate = gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc_in(x), approximate=self.gelu_approximate)  # (B, T, d_ff)
        return self.dropout(self.fc_out(h))  # (B, T, C)


class PreNormBlock(nn.Module):
    """GPT-2 layout: x + attn(ln_1(x)), then x + mlp(ln_2(x)). The residual stream is never normed,
    which is why deep pre-LN stacks train without warm-up tricks; the model adds a final ln_f."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = SelfAttention(d_model, n_head, attn_dropout, dropout, causal=True)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = FeedForward(d_model, d_ff, dropout, gelu_approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class PostNormBlock(nn.Module):
    """Original BERT layout: ln_1(x + attn(x)), then ln_2(x + mlp(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.attn = SelfAttention(d_model, n_head, attn_dropout, dropout, causal=False)
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = FeedForward(d_model, d_ff, dropout, gelu_approximate="none")
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, attn_mask))  # (B, T, C)
        x = self.ln_2(x + self.mlp(x))  # (B, T, C)
        return x


def init_weights(module: nn.Module, std: float) -> None:
    """GPT-2 / BERT initialisation: N(0, std) weights, zero biases, unit LayerNorm gains."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def scale_residual_init(blocks: nn.ModuleList, std: float) -> None:
    """GPT-2: each residual branch's last projection gets std / √(2·n_layer), because 2·n_layer
    branches add into the stream and its variance would otherwise grow with depth."""
    scaled = std / math.sqrt(2 * len(blocks))
    for block in blocks:
        nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=scaled)
        nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=scaled)
