"""The Transformer pieces shared by GPT and BERT.

Reads top-down: attention → feed-forward → the two block layouts (pre-LN for GPT, post-LN for BERT)
→ initialisation. Then the newer alternatives, each replacing one part and chosen by one
``ModelConfig`` field: RMSNorm (``norm``), the gated feed-forward (``mlp: swiglu|geglu``), rotary
positions (``position: rope``); grouped-query attention is ``SelfAttention`` with fewer key/value
heads (``n_kv_heads``). ``make_block`` assembles a block from the parts a config names; with the
defaults it builds exactly GPT-2's and BERT's blocks.

Single-device PyTorch only: this package never imports torch.distributed, deepspeed or ray; the
training engine wraps these modules. Which keys a query may see is decided in attention_masks.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention_masks import attend

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

#: (cos, sin), each (B or 1, 1, T, head size), from RotaryEmbedding
Rope = tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    """Multi-head self-attention: Q/K/V projections, softmax(q·kᵀ/√hs)·v, output projection.

    ``n_kv_heads`` < ``n_head`` is grouped-query attention (GQA, Ainslie et al. 2023; 1 = multi-query):
    each key/value head serves ``n_head / n_kv_heads`` query heads, which shrinks K/V and their cache.
    """

    def __init__(self, d_model: int, n_head: int, attn_dropout: float, resid_dropout: float, causal: bool,
                 bias: bool = True, n_kv_heads: int | None = None):
        super().__init__()
        self.n_head, self.causal, self.attn_dropout = n_head, causal, attn_dropout
        kv_width = d_model // n_head * (n_kv_heads or n_head)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_width, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, attn_mask=None, rope: Rope | None = None) -> torch.Tensor:
        """``attn_mask``: None (plain causal / full attention), or a mask from attention_masks.py
        (a causal layer's mask already includes the causal rule). ``rope``: rotate q and k first."""
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # One fused kernel (flash / memory-efficient attention on GPU) instead of materialising the
        # (T, T) score matrix in Python.
        y = attend(q, k, v, attn_mask, causal=self.causal,
                   dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.out_proj(y))  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise feed-forward network: expand to d_ff, GELU, project back."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, gelu_approximate: str, bias: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        # GPT-2 was trained with the tanh approximation ("gelu_new"), BERT with the exact erf GELU;
        # matching each keeps exported checkpoints numerically identical in transformers.
        self.gelu_approximate = gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc_in(x), approximate=self.gelu_approximate)  # (B, T, d_ff)
        return self.dropout(self.fc_out(h))  # (B, T, C)


class PreNorm(nn.Module):
    """Pre-norm layout: x + attn(ln_1(x)), then x + mlp(ln_2(x)). The residual stream is never
    normed, which is why deep pre-LN stacks train without warm-up tricks; the model adds a final norm."""

    def __init__(self, ln_1: nn.Module, attn: SelfAttention, ln_2: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x: torch.Tensor, attn_mask=None, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, rope)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class PostNorm(nn.Module):
    """Post-norm layout (the original Transformer and BERT): ln_1(x + attn(x)), then ln_2(x + mlp(x))."""

    def __init__(self, attn: SelfAttention, ln_1: nn.Module, mlp: nn.Module, ln_2: nn.Module):
        super().__init__()
        # registered in this order so the parameter order, and DeepSpeed's flat layout, stays BERT's
        self.attn, self.ln_1, self.mlp, self.ln_2 = attn, ln_1, mlp, ln_2

    def forward(self, x: torch.Tensor, attn_mask=None, rope: Rope | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, attn_mask, rope))  # (B, T, C)
        x = self.ln_2(x + self.mlp(x))  # (B, T, C)
        return x


class PreNormBlock(PreNorm):
    """GPT-2's block: LayerNorm, causal multi-head attention, GELU (tanh) feed-forward."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__(
            nn.LayerNorm(d_model, eps=eps),
            SelfAttention(d_model, n_head, attn_dropout, dropout, causal=True),
            nn.LayerNorm(d_model, eps=eps),
            FeedForward(d_model, d_ff, dropout, gelu_approximate="tanh"),
        )


class PostNormBlock(PostNorm):
    """BERT's block: bidirectional multi-head attention, LayerNorm, exact-GELU feed-forward, LayerNorm."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__(
            SelfAttention(d_model, n_head, attn_dropout, dropout, causal=False),
            nn.LayerNorm(d_model, eps=eps),
            FeedForward(d_model, d_ff, dropout, gelu_approximate="none"),
            nn.LayerNorm(d_model, eps=eps),
        )


def init_weights(module: nn.Module, std: float) -> None:
    """GPT-2 / BERT initialisation: N(0, std) weights, zero biases, unit norm gains."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, (nn.LayerNorm, RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def scale_residual_init(blocks: nn.ModuleList, std: float) -> None:
    """GPT-2: each residual branch's last projection gets std / √(2·n_layer), because 2·n_layer
    branches add into the stream and its variance would otherwise grow with depth."""
    scaled = std / math.sqrt(2 * len(blocks))
    for block in blocks:
        nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=scaled)
        nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=scaled)


# ------------------------------------------------------------- alternatives, one config field each


class RMSNorm(nn.Module):
    """``norm: rmsnorm`` (Zhang & Sennrich 2019; Llama): x / rms(x) · g — LayerNorm without the mean
    and the bias. Computed in fp32 whatever the input dtype, as Llama does."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C)
        return self.weight * h.to(x.dtype)


_GATE_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}  # geglu: exact GELU, as ModernBERT


class GatedFeedForward(nn.Module):
    """``mlp: swiglu|geglu`` (Shazeer 2020): act(x·W_gate) * (x·W_up), projected back. SwiGLU (SiLU,
    Llama) or GeGLU (GELU, ModernBERT). One fused input projection holds [W_gate; W_up] (2·d_ff
    rows), as ModernBERT stores it; a third matrix for the same width is why gated MLPs default
    to 8/3 · d_model instead of 4 · d_model (same parameters)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, kind: str, bias: bool):
        super().__init__()
        self.fc_in = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.act = _GATE_ACTIVATIONS[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc_in(x).chunk(2, dim=-1)  # (B, T, d_ff) each
        return self.dropout(self.fc_out(self.act(gate) * up))  # (B, T, C)


class RotaryEmbedding(nn.Module):
    """``position: rope`` (Su et al. 2021): rotates each pair of channels (i, i + hs/2) of queries
    and keys by the angle pos · θ^(-2i/hs), so q·k depends only on the distance between the two
    tokens. No parameters: (cos, sin) are computed in fp32 from the position ids at each forward
    (cheap next to attention, and a bf16 engine cannot round a cached table)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> Rope:
        """``positions``: (B or 1, T) → (cos, sin), each (B or 1, 1, T, hs) in fp32."""
        hs = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hs, 2, device=positions.device).float() / hs))
        angles = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hs)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hs) rotated by the angles of (cos, sin); in fp32, returned in x's dtype."""
    h = x.float()
    first, second = h.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)  # the pair partner, rotated by 90°
    return (h * cos + rotated * sin).to(x.dtype)


# ------------------------------------------------------------- choosing the parts from the config


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)


def make_feed_forward(cfg: ModelConfig) -> nn.Module:
    if cfg.mlp == "gelu":
        approximate = "tanh" if cfg.arch == "gpt" else "none"
        return FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout, approximate, bias=cfg.bias)
    return GatedFeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.mlp, cfg.bias)


def make_block(cfg: ModelConfig, i: int) -> PreNorm | PostNorm:
    """Block ``i`` from the parts ``cfg`` names (the defaults give PreNormBlock / PostNormBlock)."""
    attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.attn_dropout, cfg.dropout, causal=cfg.arch == "gpt",
                         bias=cfg.bias, n_kv_heads=cfg.n_kv_heads)
    if not cfg.pre_norm:
        return PostNorm(attn, make_norm(cfg), make_feed_forward(cfg), make_norm(cfg))
    # a pre-norm encoder (ModernBERT) norms its embeddings already: block 0 would norm them twice
    first = nn.Identity() if i == 0 and cfg.arch == "bert" else make_norm(cfg)
    return PreNorm(first, attn, make_norm(cfg), make_feed_forward(cfg))
