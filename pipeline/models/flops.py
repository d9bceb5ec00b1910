"""Parameter counts and training FLOPs, analytically from the config (no model is built).

Used by the planner (memory estimate before any GPU is allocated) and by the MFU metric. Every
option of ``ModelConfig`` is covered: grouped-query attention, gated MLPs, RMSNorm, missing biases,
rotary positions (no parameters), untied embeddings and local attention.
"""

from __future__ import annotations

from pipeline.config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    d = cfg.d_model
    return d if cfg.norm == "rmsnorm" or not cfg.bias else 2 * d  # gain, and a bias if any


def _attention_params(cfg: ModelConfig) -> int:
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    weights = 2 * d * d + 2 * d * kv  # q and out projections; k and v for the kv heads only
    return weights + (2 * d + 2 * kv if cfg.bias else 0)


def _ffn_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.ffn_dim
    branches = 1 if cfg.mlp == "gelu" else 2  # a gated MLP has a second input matrix
    return (branches + 1) * d * f + ((branches * f + d) if cfg.bias else 0)


def _block_params(cfg: ModelConfig, i: int) -> int:
    # a pre-norm encoder's first block has no input norm (its embeddings are normed already)
    norms = 1 if cfg.pre_norm and cfg.arch == "bert" and i == 0 else 2
    return _attention_params(cfg) + _ffn_params(cfg) + norms * _norm_params(cfg)


def param_count(cfg: ModelConfig, *, include_position: bool = True, include_embedding: bool = True) -> int:
    """Trainable parameters of ``build_model(cfg)``; a tied embedding is counted once.

    ``include_position=False`` leaves out the learned position embeddings (the convention for the
    6·N FLOPs rule: a table lookup costs no matmul). ``include_embedding=False`` also leaves out the
    token embedding and an untied output projection ("non-embedding" parameters, Kaplan et al.).
    """
    d, V = cfg.d_model, cfg.padded_vocab_size
    n = sum(_block_params(cfg, i) for i in range(cfg.n_layer))
    embeddings = V * d + (0 if cfg.tie_embeddings else V * d)
    if cfg.arch == "gpt":
        n += _norm_params(cfg)  # final norm
    else:
        n += cfg.type_vocab_size * d + _norm_params(cfg)  # segment embeddings, embedding norm
        n += _norm_params(cfg) if cfg.pre_norm else 0  # final norm
        n += d * d + (d if cfg.bias else 0) + _norm_params(cfg) + V  # MLM head: dense, norm, decoder bias
    if include_embedding:
        n += embeddings
    if include_position and cfg.position == "learned":
        n += cfg.max_seq_len * d
    return n


def attention_context(cfg: ModelConfig, i: int, seq_len: int) -> int:
    """Keys a query of block ``i`` is scored against: the window (and itself) in a local layer."""
    if cfg.is_local_layer(i):
        return min(seq_len, cfg.local_attention_window + 1)
    return seq_len


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per trained token: 6·N + 12·d·Σ context (PaLM, appendix B).

    6·N covers every matmul with a weight (2 FLOPs per multiply-add forward, twice that backward);
    N leaves out position embeddings and the input embedding lookup but keeps the output projection
    (the tied token embedding, or the untied head). 12·d·context per block is the attention score
    and weighted-sum matmuls: the whole window of T tokens in a global layer (PaLM's convention
    for causal layers too), window + 1 in a local one; GQA shares keys but scores every query head,
    so it changes only N. Masking packed documents apart is not credited: MFU counts the model's
    FLOPs, not what a kernel skips. For BERT this counts the output projection at every position,
    although the sparse MLM head computes it only at the ~15% masked ones, so an MFU derived from
    it overstates BERT's useful work (by about a sixth at BERT-base size, T=512).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = param_count(cfg, include_position=False)
    if not cfg.tie_embeddings:
        n -= cfg.padded_vocab_size * cfg.d_model  # the input table is looked up, not multiplied
    context = sum(attention_context(cfg, i, seq_len) for i in range(cfg.n_layer))
    return 6 * n + 12 * cfg.d_model * context
