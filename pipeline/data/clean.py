"""Cleaning: Unicode normalization, then quality filters (all pure functions of one document).

A filter that fails names itself: the document goes to quarantine with reason ``filter:<name>``,
where the name is the `data.clean` field that set the limit. Filters run in a fixed order (the order
they are registered in, below) and the first failure wins, so the per-filter counts in the manifest
add up to the documents filtered out. The counts use C-speed string operations (split, count,
re.sub), never a Python loop per character.

A new filter is one definition here, a function decorated with ``@quality_filter("<field>")`` that
says whether a document fails the limit `CleanConfig.<field>` sets, beside that field in the one
config tree (config.py; tests/unit/test_append_merge.py checks every registered filter has one).
Registering appends it to ``FILTERS``, which the dedup pass's verdicts (``.stages/dedup-filtered.npy``)
index into; the order of ``FILTERS`` enters the dedup stage's fingerprint, so a changed registry
re-runs that stage instead of misreading its verdicts.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import CleanConfig

_LETTERS = re.compile(r"[^\W\d_]+")  # runs of letters (word characters minus digits and underscore)
_SPACE = re.compile(r"\s+")


class Document:
    """One normalized document as the filters see it; what several filters need is computed once."""

    __slots__ = ("text", "_words")

    def __init__(self, text: str):
        self.text = text
        self._words: int | None = None

    @property
    def words(self) -> int:
        """Whitespace-separated words (counted on first use, by whichever filter needs them first)."""
        if self._words is None:
            self._words = len(self.text.split())
        return self._words


@dataclass(frozen=True)
class QualityFilter:
    """A filter: ``fails(document, limit)`` for the limit `CleanConfig.<field>` sets (None: off)."""

    name: str
    field: str
    fails: Callable[[Document, float], bool]

    @property
    def reason(self) -> str:
        return f"filter:{self.name}"


REGISTRY: dict[str, QualityFilter] = {}


def quality_filter(field: str):
    """Register the decorated ``fails(document, limit) -> bool`` as the filter named ``field``."""

    def register(fails: Callable[[Document, float], bool]):
        if field in REGISTRY:
            raise ValueError(f"quality filter {field!r} is registered twice")
        REGISTRY[field] = QualityFilter(field, field, fails)
        return fails

    return register


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


# ---- the filters, in the order they run ------------------------------------------------------------

@quality_filter("min_chars")
def _too_short(doc: Document, limit: int) -> bool:
    return len(doc.text) < limit


@quality_filter("max_chars")
def _too_long(doc: Document, limit: int) -> bool:
    return len(doc.text) > limit


@quality_filter("min_words")
def _too_few_words(doc: Document, limit: int) -> bool:
    return doc.words < limit


@quality_filter("max_symbol_word_ratio")
def _too_many_symbols(doc: Document, limit: float) -> bool:
    return symbol_word_ratio(doc.text, doc.words) > limit


@quality_filter("min_alpha_ratio")
def _too_few_letters(doc: Document, limit: float) -> bool:
    return alpha_ratio(doc.text) < limit


@quality_filter("max_repeated_line_ratio")
def _too_repetitive(doc: Document, limit: float) -> bool:
    return repeated_line_ratio(doc.text) > limit


FILTERS = tuple(REGISTRY)  # names in running order; .stages/dedup-filtered.npy stores indexes into it


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """``filter:<name>`` of the first failing quality filter, None if the document passes all."""
    doc = Document(text)
    for f in REGISTRY.values():
        limit = getattr(cfg, f.field)
        if limit is not None and f.fails(doc, limit):
            return f.reason
    return None


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, str | None]:
    """(normalized text, reason or None): what every stage sees of a document."""
    text = normalize(text, cfg.normalization)
    return text, filter_reason(text, cfg)
