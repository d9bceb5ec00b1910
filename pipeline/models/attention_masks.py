"""Which keys each query may see: causal order, padding, packed documents, local windows.

Every attention mask the models use is built here from one rule per condition:

- causal: a query sees itself and earlier positions (GPT);
- padding: nobody sees a padding key (BERT's ``attention_mask``);
- documents: inside a packed window a query sees only its own document (``doc_ids``), whose
  positions restart at 0 — so a packed row trains exactly like its documents one by one;
- local window: a query sees keys at most ``window // 2`` positions away (ModernBERT's local layers).

A mask is None (nothing to hide beyond causal order: the fused flash kernels run with their own
causal flag), a boolean tensor broadcastable to (B, heads, T, T), True where a query may look
(``kernel="sdpa"``: any device, the reference), or a FlexAttention ``BlockMask`` (``kernel="flex"``:
the same rule evaluated per 128×128 tile, so tiles with nothing to see are skipped, compiled).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document begins (position 0, or where the id changes)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_index(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T): 0 for a row's first document, 1 for the next, ... Only changes of ``doc_ids`` count,
    so any ids that differ between neighbouring documents will do (two documents apart that share
    an id are still two documents)."""
    return document_starts(doc_ids).long().cumsum(dim=1) - 1


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that restart at 0 at each document start."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    start = torch.where(document_starts(doc_ids), index, 0).cummax(dim=1).values  # (B, T)
    return index - start


def positions(doc_ids: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor:
    """Position ids, (1, T) without documents, else (B, T) restarting per document."""
    if doc_ids is None:
        return torch.arange(seq_len, device=device)[None]
    return document_positions(doc_ids)


def build_mask(*, causal: bool, seq_len: int, device: torch.device, doc_ids: torch.Tensor | None = None,
               padding: torch.Tensor | None = None, window: int | None = None, kernel: str = "sdpa"):
    """The mask of one attention layer, or None when plain causal / full attention needs none.

    ``doc_ids``: (B, T), documents packed in each row; ``padding``: (B, T) bool, True for real
    tokens; ``window``: keys at most window // 2 away. Every query also sees itself (a real token
    does anyway), so a padding query far from any real key never has an empty softmax, which
    kernels answer differently (NaN, which would leak through the next layer's 0-weighted values,
    or zeros).
    """
    if doc_ids is None and padding is None and window is None:
        return None
    docs = None if doc_ids is None else document_index(doc_ids)
    if kernel == "flex":
        return _block_mask(causal, docs, padding, window, seq_len, device)
    if kernel != "sdpa":
        raise ValueError(f"model.attention_kernel: unknown kernel {kernel!r} (expected sdpa or flex)")
    if docs is None and window is None and not causal:
        return padding[:, None, None, :]  # (B, 1, 1, T): BERT's padding mask
    q = torch.arange(seq_len, device=device)[:, None]  # (T, 1)
    k = torch.arange(seq_len, device=device)[None, :]  # (1, T)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)[None, None]  # (1, 1, T, T)
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        allowed = allowed & ((q - k).abs() <= window // 2)
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])  # (B, 1, T, T)
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    return allowed | (q == k)


def _block_mask(causal: bool, docs, padding, window: int | None, seq_len: int, device):
    """The same rule as a FlexAttention BlockMask (the ``if``s run once, while the mask is built)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, k):
        ok = q >= 0  # all True, in the shape and device of the index tensors
        if causal:
            ok = ok & (k <= q)
        if window is not None:
            ok = ok & ((q - k).abs() <= window // 2)
        if docs is not None:
            ok = ok & (docs[b, q] == docs[b, k])
        if padding is not None:
            ok = ok & padding[b, k]
        return ok | (q == k)

    batch = None if docs is None and padding is None else (docs if docs is not None else padding).shape[0]
    return create_block_mask(allowed, batch, None, seq_len, seq_len, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # uncompiled, flex_attention materialises the full score matrix; compiled it is one fused kernel
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, causal: bool,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ/√hs + mask)·v for q (B, nh, T, hs) and k, v (B, n_kv, T, hs), n_kv dividing nh.

    With a tensor mask the key/value heads are repeated for the query heads: SDPA's ``enable_gqa``
    has no masked fused kernel on GPU, and would fall back to the slow math path.
    """
    grouped = k.shape[1] != q.shape[1]
    if mask is None or isinstance(mask, torch.Tensor):
        if grouped and mask is not None:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, T, hs)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, nh, T, hs)
            grouped = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal and mask is None, enable_gqa=grouped)
    if dropout_p:
        raise ValueError("attention_kernel flex has no attention dropout; set model.attn_dropout 0")
    return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=grouped)
