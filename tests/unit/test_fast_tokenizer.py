import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from pipeline.config import TokenizerConfig
from pipeline.data import fast_tokenizer
from pipeline.data.fast_tokenizer import (
    PROBE_TEXTS, Encoder, NotConvertible, choose_encoder, first_mismatch, hf_tokenizer, tiktoken_encoding,
)
from pipeline.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit

VARIED = [
    "Unicode: naïve café, Ærøskøbing, ﬁnance, Ǆemal, ΑΒΓ αβγ, кириллица,",
    "中文字符, 日本語, 한국어, עברית, العربية.",
    "Emoji: 👩‍👩‍👧‍👦 👍🏽 🏳️‍🌈 ❤️🔥 ✈️ 🇫🇷",
    "Whitespace:   three spaces\t\ttabs\n\n\nnewlines\r\nCRLF \u00a0nbsp \u2003em \u3000 ideographic   ",
    "Digits: 0 1 22 333 4444 55555 3.14159 1,000,000 ٣٤٥ ²³ ½ Ⅻ",
    "Contractions: it's they're we've I'm you'll he'd DON'T 'quoted' O'Brien's",
    "Special tokens as text: <|endoftext|> [SEP] [CLS] [MASK] </s>",
    "Code: def f(x):\n    return {'a': [1, 2]}  # ok\n\tif x != y: pass\n",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    from pipeline.data.demo_corpus import stdlib_docstrings

    texts = [t for _, (_n, t) in zip(range(300), stdlib_docstrings())] + VARIED * 20
    return train_tokenizer(texts, TokenizerConfig(vocab_size=1500))


def test_tiktoken_matches_tokenizers_on_varied_text(bpe):
    enc = tiktoken_encoding(bpe)
    hf = hf_tokenizer(bpe.to_str())
    for text in VARIED + list(PROBE_TEXTS):
        assert enc.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids, text


PIECES = st.sampled_from([
    " ", "  ", "\n", "\n\n", "\r\n", "\t", "\u00a0", "\u3000", "'s", "'ll", " 's", "'S", "123", "4",
    "<|endoftext|>", "👍🏽", "é", "e\u0301", "中文", "—", "...", "\x0b", "\x1c", "\x85", "\u2028", "\u200b",
])


@given(st.lists(st.one_of(st.text(max_size=12), PIECES), max_size=30).map("".join))
@settings(max_examples=300, deadline=None)
def test_tiktoken_matches_tokenizers_on_generated_text(bpe, text):
    enc = _fast(bpe)
    assert enc.encode_ordinary(text) == _hf(bpe).encode(text, add_special_tokens=False).ids


_CACHE = {}


def _fast(tok):
    return _CACHE.setdefault("fast", tiktoken_encoding(tok))


def _hf(tok):
    return _CACHE.setdefault("hf", hf_tokenizer(tok.to_str()))


def test_special_token_text_inside_a_document_is_plain_text_on_both_paths(bpe):
    eod = bpe.token_to_id("<|endoftext|>")
    for kind in ("tiktoken", "tokenizers"):
        ids = Encoder(bpe.to_str(), kind).encode(["before <|endoftext|> after"])[0]
        assert eod not in ids
        assert bpe.decode(ids) == "before <|endoftext|> after"


def test_the_fast_encoder_is_chosen_only_when_it_matches(bpe, monkeypatch):
    kind, why = choose_encoder(bpe.to_str(), VARIED)
    assert kind == "tiktoken" and "identical" in why
    assert choose_encoder(bpe.to_str(), VARIED, allow_fast=False)[0] == "tokenizers"
    # a run-time mismatch (here: tiktoken with another pre-tokenization regex) falls back
    real = fast_tokenizer.tiktoken_encoding

    def wrong_pattern(tok):
        import tiktoken

        enc = real(tok)
        return tiktoken.Encoding("wrong", pat_str=r"\S+|\s+", mergeable_ranks=enc._mergeable_ranks,
                                 special_tokens=enc._special_tokens)

    monkeypatch.setattr(fast_tokenizer, "tiktoken_encoding", wrong_pattern)
    kind, why = choose_encoder(bpe.to_str(), VARIED)
    assert kind == "tokenizers" and "differs" in why
    assert first_mismatch(wrong_pattern(bpe), hf_tokenizer(bpe.to_str()), ["ok", "one two"]).startswith("text 1")


def test_tokenizers_that_tiktoken_cannot_reproduce_fall_back(bpe):
    wordpiece = train_tokenizer(VARIED * 5, TokenizerConfig(type="wordpiece", vocab_size=300))
    kind, why = choose_encoder(wordpiece.to_str(), VARIED)
    assert kind == "tokenizers" and "WordPiece" in why
    with_normalizer = Tokenizer.from_str(bpe.to_str())
    with_normalizer.normalizer = normalizers.Lowercase()
    with pytest.raises(NotConvertible, match="normalizer"):
        tiktoken_encoding(with_normalizer)
    plain_added = Tokenizer.from_str(bpe.to_str())
    plain_added.add_tokens(["hello world"])
    with pytest.raises(NotConvertible, match="non-special added tokens"):
        tiktoken_encoding(plain_added)
    spec = json.loads(bpe.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    with pytest.raises(NotConvertible, match="out of id order"):
        tiktoken_encoding(Tokenizer.from_str(json.dumps(spec)))
    wp = Encoder(wordpiece.to_str(), "tokenizers").encode(["Hello [SEP] world"])[0]
    assert wordpiece.token_to_id("[SEP]") not in wp
