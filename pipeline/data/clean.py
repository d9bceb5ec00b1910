"""Cleaning: Unicode normalization, then quality filters (all pure functions of one document).

A filter that fails names itself: the document goes to quarantine with reason ``filter:<name>``,
where the name is the `data.clean` field that set the limit. Filters run in a fixed order and the
first failure wins, so the per-filter counts in the manifest add up to the documents filtered out.
The counts use C-speed string operations (split, count, re.sub), never a Python loop per character.
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.config import CleanConfig

FILTERS = (
    "min_chars", "max_chars", "min_words", "max_symbol_word_ratio", "min_alpha_ratio",
    "max_repeated_line_ratio",
)
_LETTERS = re.compile(r"[^\W\d_]+")  # runs of letters (word characters minus digits and underscore)
_SPACE = re.compile(r"\s+")


def normalize(text: str, form: str) -> str:
    if form == "none" or unicodedata.is_normalized(form, text):
        return text
    return unicodedata.normalize(form, text)


def symbol_word_ratio(text: str, words: int) -> float:
    """'#' and ellipses per word (Gopher's symbol-to-word ratio)."""
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return symbols / max(words, 1)


def alpha_ratio(text: str) -> float:
    """Letters as a share of the non-whitespace characters."""
    visible = _SPACE.sub("", text)
    if not visible:
        return 0.0
    return (len(visible) - len(_LETTERS.sub("", visible))) / len(visible)


def repeated_line_ratio(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """``filter:<name>`` of the first failing quality filter, None if the document passes all."""
    n = len(text)
    if cfg.min_chars is not None and n < cfg.min_chars:
        return "filter:min_chars"
    if cfg.max_chars is not None and n > cfg.max_chars:
        return "filter:max_chars"
    need_words = cfg.min_words is not None or cfg.max_symbol_word_ratio is not None
    words = len(text.split()) if need_words else 0
    if cfg.min_words is not None and words < cfg.min_words:
        return "filter:min_words"
    if cfg.max_symbol_word_ratio is not None and symbol_word_ratio(text, words) > cfg.max_symbol_word_ratio:
        return "filter:max_symbol_word_ratio"
    if cfg.min_alpha_ratio is not None and alpha_ratio(text) < cfg.min_alpha_ratio:
        return "filter:min_alpha_ratio"
    if cfg.max_repeated_line_ratio is not None and repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return "filter:max_repeated_line_ratio"
    return None


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, str | None]:
    """(normalized text, reason or None): what every stage sees of a document."""
    text = normalize(text, cfg.normalization)
    return text, filter_reason(text, cfg)
