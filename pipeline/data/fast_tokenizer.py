"""Encoding at tokenizer speed: tiktoken built from our byte-level BPE, else HF `tokenizers`.

tiktoken's BPE merges the adjacent pair whose concatenation has the lowest rank; HF's merges the
pair with the lowest merge index. They agree when the rank of every token is its id and ids grow in
merge order, which holds for a BPE trained by `tokenizers` (specials first, the 256 bytes, then one
token per merge). The pre-tokenizer must be the same too: ByteLevel with ``use_regex`` splits on
GPT-2's pattern (``GPT2_PATTERN``), which tiktoken then runs itself.

Everything else falls back to `tokenizers`: WordPiece, a normalizer, another pre-tokenizer, BPE
dropout or subword prefixes, non-special added tokens, and any tokenizer whose tiktoken encoding
differs from `tokenizers` on the probe texts or the sample of the corpus checked at run time.
Special tokens inside a document are encoded as the plain text they are, on both paths: only the
end-of-document token the pipeline appends is special.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from tokenizers import Tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE_TEXTS = (
    "Hello, world! It's the cat's toy; they'll say we've I'm you'd THEY'RE O'Neil's.",
    "  leading and trailing spaces   \n\n\n  \t\ttabs\r\nwindows\rcr \x0b\x0c",
    " \u00a0nbsp \u3000ideographic \u2028line separator \x85next line \u200bzero width",
    "digits 0 12 345 6789 1,234.56 1e-9 ٣٤٥ ¾ Ⅻ 𝟙𝟚",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ combining é vs é, Ǆ ǅ ǆ; ﬁ ligature",
    "中文文本，日本語のテキスト、한국어 텍스트. العربية עברית ไทย देवनागरी",
    "special tokens as text: <|endoftext|> [SEP] [CLS] <s></s> <pad>",
    "code:\n    def f(x):\n        return x ** 2  # comment\n\tif a != b: pass\n",
    "\n\n\n", "   ", "a", "'s", " 's", "x" * 300, "é" * 200 + "!!!???" * 20,
)


_HUGE_CHARS = 1 << 22


class NotConvertible(ValueError):
    """The tokenizer cannot be encoded with tiktoken exactly; `tokenizers` is used instead."""


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character → byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _check_convertible(spec: dict) -> None:
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise NotConvertible(f"model is {model.get('type')}, not BPE")
    if spec.get("normalizer"):
        raise NotConvertible("the tokenizer has a normalizer")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise NotConvertible(f"pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True): {pre}")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotConvertible(f"BPE has {key}={model[key]!r}")
    if model.get("byte_fallback"):
        raise NotConvertible("BPE uses byte_fallback")
    plain = [t["content"] for t in spec.get("added_tokens", []) if not t.get("special")]
    if plain:
        raise NotConvertible(f"non-special added tokens {plain[:5]} are matched before BPE")


def tiktoken_encoding(tok: Tokenizer):
    """A tiktoken Encoding equivalent to ``tok`` (byte-level BPE), or NotConvertible saying why."""
    import tiktoken

    spec = json.loads(tok.to_str())
    _check_convertible(spec)
    model, dec = spec["model"], _byte_decoder()
    try:
        ranks = {bytes(dec[c] for c in token): idx for token, idx in model["vocab"].items()}
    except KeyError as exc:
        raise NotConvertible(f"vocabulary entry with a non byte-level character {exc}") from None
    if len(ranks) != len(model["vocab"]):
        raise NotConvertible("two vocabulary entries decode to the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NotConvertible(f"{len(missing)} single bytes are not in the vocabulary")
    vocab, last = model["vocab"], -1
    for merge in model["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        idx = vocab.get(a + b)
        if idx is None or idx <= last:
            raise NotConvertible(f"merge {a!r} + {b!r} is out of id order; ranks would differ")
        last = idx
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["content"] not in vocab}
    return tiktoken.Encoding("pretrain-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def hf_tokenizer(tokenizer_json: str) -> Tokenizer:
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # a special token's text inside a document is plain text
    return tok


class Encoder:
    """Documents → token ids, with tiktoken (kind "tiktoken") or `tokenizers` (kind "tokenizers")."""

    def __init__(self, tokenizer_json: str, kind: str):
        self.kind = kind
        self.hf = hf_tokenizer(tokenizer_json)
        self.fast = tiktoken_encoding(self.hf) if kind == "tiktoken" else None

    def encode(self, texts: list[str]) -> list:
        """One id sequence (a list, or a uint32 array for a huge document) per text."""
        if self.fast is not None:
            # encode_to_numpy skips the Python int per token (GBs for a 100 MB document); no special
            # token is allowed, so their text is encoded as text, as encode_ordinary does
            return [self.fast.encode_ordinary(t) if len(t) < _HUGE_CHARS else
                    self.fast.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_flat(self, texts: list[str], eod_id: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): every text's ids followed by ``eod_id``, end to end in one array of ``dtype``,
        and each text's length in it. One document at a time, so at most one document's Python ints
        exist at once; ``np.fromiter`` turns them into ``dtype`` without a second list."""
        dtype = np.dtype(dtype)
        parts, eod = [], np.array([eod_id], dtype=dtype)
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, ids in enumerate(self._each(texts)):
            parts.append(np.fromiter(ids, dtype, len(ids)) if isinstance(ids, list) else ids.astype(dtype))
            parts.append(eod)
            lengths[i] = len(ids) + 1
        return (np.concatenate(parts) if parts else np.zeros(0, dtype)), lengths

    def _each(self, texts: list[str]):
        if self.fast is None:
            yield from self.encode(texts)
            return
        for t in texts:
            yield self.fast.encode_ordinary(t) if len(t) < _HUGE_CHARS else \
                self.fast.encode_to_numpy(t, allowed_special=set(), disallowed_special=())


def first_mismatch(fast, hf: Tokenizer, texts) -> str | None:
    """None if tiktoken and `tokenizers` give the same ids for every text, else where they differ."""
    for i, text in enumerate(texts):
        a = fast.encode_ordinary(text)
        b = hf.encode(text, add_special_tokens=False).ids
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"text {i} ({text[:40]!r}…) differs at token {at}"
    return None


def choose_encoder(tokenizer_json: str, sample_texts, allow_fast: bool = True) -> tuple[str, str]:
    """(kind, why): "tiktoken" when convertible and identical on the probes and the sample."""
    if not allow_fast:
        return "tokenizers", "data.tokenizer.fast_encoder is off"
    hf = hf_tokenizer(tokenizer_json)
    try:
        fast = tiktoken_encoding(hf)
    except NotConvertible as exc:
        return "tokenizers", str(exc)
    sample = list(sample_texts)
    mismatch = first_mismatch(fast, hf, list(PROBE_TEXTS) + sample)
    if mismatch:
        return "tokenizers", f"tiktoken differs from tokenizers: {mismatch}"
    return "tiktoken", f"identical to tokenizers on {len(PROBE_TEXTS)} probes and {len(sample)} sampled documents"


def ids_array(ids, eod_id: int, dtype) -> np.ndarray:
    """A document's ids with the end-of-document id appended, in the shard dtype."""
    out = np.empty(len(ids) + 1, dtype=dtype)
    out[:-1] = ids
    out[-1] = eod_id
    return out
