"""Raw corpus readers. Each yields every record with its position, good or bad: bad records carry
a reason and go to quarantine, so nothing is dropped without a trace."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Record:
    source: int  # index of the source in data.sources
    line: int  # 1-based line number in the file
    text: str | None  # None when the record is bad
    reason: str | None = None  # why it is bad
    raw: str | None = None  # a bounded excerpt of a bad record, for the quarantine file


def _excerpt(raw: bytes | str, limit: int = 200) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="backslashreplace")
    return raw[:limit]


def read_jsonl(path: str | Path, source: int, text_field: str) -> Iterator[Record]:
    """Yield one Record per non-blank line of a jsonl file."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(source, line_no, None, f"invalid_utf8: {exc.reason} at byte {exc.start}", _excerpt(raw))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(source, line_no, None, f"malformed_json: {exc.msg}", _excerpt(line))
                continue
            if not isinstance(obj, dict):
                yield Record(source, line_no, None, f"not_an_object: got {type(obj).__name__}", _excerpt(line))
                continue
            if text_field not in obj:
                yield Record(source, line_no, None, f"missing_field: {text_field!r}", _excerpt(line))
                continue
            text = obj[text_field]
            if not isinstance(text, str):
                yield Record(source, line_no, None, f"not_a_string: {text_field!r} is {type(text).__name__}", _excerpt(line))
                continue
            text = text.lstrip("\ufeff").replace("\x00", "")
            if not text.strip():
                yield Record(source, line_no, None, "empty_text", _excerpt(line))
                continue
            yield Record(source, line_no, text)
