"""BERT masked-language-model corruption as a pure function of (seed, sample index).

No generator state is carried between samples, so a resumed or re-sharded run masks every sample
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = -100  # label value the loss skips (torch cross_entropy's default ignore_index)


def mask_tokens(
    tokens: np.ndarray,
    *,
    seed: int,
    sample_index: int,
    vocab_size: int,
    mask_id: int,
    special_ids: Iterable[int],
    mask_prob: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (input_ids, labels), both int64 and shaped like ``tokens``.

    ``round(mask_prob · n)`` of the n non-special positions are chosen (at least one when n > 0, so
    a sample always contributes to the loss). Of those, 80% become ``mask_id``, 10% a random
    non-special token from ``[0, vocab_size)`` and 10% stay unchanged (decided per position).
    ``labels`` holds the original token at chosen positions and -100 elsewhere. ``special_ids``
    (CLS, SEP, PAD, end-of-document, MASK) are never chosen nor drawn as random replacements.
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if seed < 0 or sample_index < 0:
        raise ValueError(f"seed and sample_index must be non-negative, got {seed}, {sample_index}")
    specials = np.unique(np.asarray(list(special_ids), dtype=np.int64))  # sorted
    if mask_id not in specials:
        specials = np.union1d(specials, [mask_id])
    n_replacements = vocab_size - int(np.count_nonzero(specials < vocab_size))
    if n_replacements <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no non-special token to draw")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, sample_index])))

    flat = np.asarray(tokens).astype(np.int64).ravel()  # (T,)
    candidates = np.flatnonzero(~np.isin(flat, specials))  # (n,)
    labels = np.full_like(flat, IGNORE_INDEX)  # (T,)
    input_ids = flat.copy()  # (T,)
    if candidates.size:
        k = max(1, int(round(mask_prob * candidates.size)))
        chosen = rng.choice(candidates, size=k, replace=False)  # (k,)
        labels[chosen] = flat[chosen]
        fate = rng.random(k)  # (k,): < 0.8 mask, < 0.9 random token, else unchanged
        to_mask, to_random = chosen[fate < 0.8], chosen[(fate >= 0.8) & (fate < 0.9)]
        input_ids[to_mask] = mask_id
        input_ids[to_random] = _draw_non_special(rng, to_random.size, n_replacements, specials)
    return input_ids.reshape(np.shape(tokens)), labels.reshape(np.shape(tokens))


def _draw_non_special(
    rng: np.random.Generator, size: int, n_allowed: int, specials: np.ndarray
) -> np.ndarray:
    """Uniform over [0, vocab) minus ``specials``: draw in [0, n_allowed), then step over each special
    id (ascending) at or below the value, which maps the draw onto the allowed ids one-to-one."""
    r = rng.integers(0, n_allowed, size=size, dtype=np.int64)  # (size,)
    for s in specials:
        r += r >= s
    return r
