import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import CleanConfig
from pipeline.data.clean import FILTERS, alpha_ratio, clean_text, filter_reason, repeated_line_ratio, symbol_word_ratio

pytestmark = pytest.mark.unit


def test_nfc_by_default_and_other_forms_on_request():
    decomposed = "Cafe\u0301 \ufb01ne"  # e + combining acute; the "fi" ligature
    assert clean_text(decomposed, CleanConfig())[0] == "Caf\u00e9 \ufb01ne"
    assert clean_text(decomposed, CleanConfig(normalization="NFKC"))[0] == "Caf\u00e9 fine"
    assert clean_text(decomposed, CleanConfig(normalization="none"))[0] == decomposed


@pytest.mark.parametrize(("limits", "text", "reason"), [
    ({"min_chars": 10}, "short", "filter:min_chars"),
    ({"max_chars": 3}, "too long", "filter:max_chars"),
    ({"min_words": 3}, "two words", "filter:min_words"),
    ({"max_symbol_word_ratio": 0.1}, "# a # b ... c", "filter:max_symbol_word_ratio"),
    ({"min_alpha_ratio": 0.5}, "12345 678 ab", "filter:min_alpha_ratio"),
    ({"max_repeated_line_ratio": 0.3}, "same\nsame\nsame\nother", "filter:max_repeated_line_ratio"),
])
def test_each_filter_names_itself(limits, text, reason):
    assert filter_reason(text, CleanConfig(**limits)) == reason
    assert reason.split(":")[1] in FILTERS
    assert filter_reason(text, CleanConfig()) is None  # every filter is off by default


def test_documents_within_the_limits_pass_and_the_first_failing_filter_wins():
    ok = "A plain sentence with enough words.\nAnd a second, different line."
    cfg = CleanConfig(min_chars=10, max_chars=1000, min_words=5, max_symbol_word_ratio=0.1, min_alpha_ratio=0.6,
                      max_repeated_line_ratio=0.3)
    assert filter_reason(ok, cfg) is None
    assert filter_reason("1 2", cfg) == "filter:min_chars"  # also fails min_words and min_alpha_ratio


def test_ratios():
    assert symbol_word_ratio("# x ... y \u2026", 4) == 0.75
    assert alpha_ratio("ab 12\n\t__") == pytest.approx(2 / 6)
    assert alpha_ratio("  ") == 0.0 and alpha_ratio("\u00e9t\u00e9") == 1.0
    assert repeated_line_ratio("a\n\nb\na\na\n") == pytest.approx(0.5)
    assert repeated_line_ratio("") == 0.0


@given(st.text(max_size=200), st.sampled_from(["NFC", "NFKC", "NFD", "NFKD"]))
def test_cleaning_is_idempotent_and_normalizes(text, form):
    cfg = CleanConfig(normalization=form)
    once, reason = clean_text(text, cfg)
    assert reason is None
    assert unicodedata.is_normalized(form, once)
    assert clean_text(once, cfg)[0] == once
