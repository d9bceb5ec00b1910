"""Parameter counts and training FLOPs, analytically from the config (no model is built).

Used by the planner (memory estimate before any GPU is allocated) and by the MFU metric.
"""

from __future__ import annotations

from pipeline.config import ModelConfig


def _block_params(d: int, d_ff: int) -> int:
    attn = 4 * (d * d + d)  # q, k, v, out projections with biases
    ffn = d * d_ff + d_ff + d_ff * d + d  # expand and project back, with biases
    norms = 2 * 2 * d  # two LayerNorms, gain and bias
    return attn + ffn + norms


def param_count(cfg: ModelConfig, *, include_position: bool = True, include_embedding: bool = True) -> int:
    """Trainable parameters of ``build_model(cfg)``; a tied embedding is counted once.

    ``include_position=False`` leaves out the learned position embeddings (the convention for the
    6·N FLOPs rule: a table lookup costs no matmul). ``include_embedding=False`` also leaves out the
    token embedding and an untied output projection ("non-embedding" parameters, Kaplan et al.).
    """
    d, V, L = cfg.d_model, cfg.padded_vocab_size, cfg.n_layer
    n = L * _block_params(d, cfg.ffn_dim)
    embeddings = V * d + (0 if cfg.tie_embeddings else V * d)
    if cfg.arch == "gpt":
        n += 2 * d  # final LayerNorm
    else:
        n += cfg.type_vocab_size * d + 2 * d  # segment embeddings, embedding LayerNorm
        n += d * d + d + 2 * d + V  # MLM head: dense, LayerNorm, decoder bias
    if include_embedding:
        n += embeddings
    if include_position:
        n += cfg.max_seq_len * d
    return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per trained token: 6·N + 12·L·d·T (PaLM, appendix B).

    6·N covers every matmul with a weight (2 FLOPs per multiply-add forward, twice that backward);
    N leaves out position embeddings but keeps the token embedding, whose transpose is the output
    projection. 12·L·d·T is the attention score and weighted-sum matmuls over a context of T tokens.
    For BERT this counts the output projection at every position, although the sparse MLM head
    computes it only at the ~15% masked ones, so an MFU derived from it overstates BERT's useful
    work (by about a sixth at BERT-base size, T=512).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = param_count(cfg, include_position=False)
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len
