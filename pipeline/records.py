"""Typed on-disk records: one type and one parser per file kind, so a malformed file is one line.

Each record (the dataset's ``manifest.json``, a checkpoint's ``COMMIT`` and ``trainer_state.json``,
an eval record) is a `Record`: a pydantic model with strict types. ``from_json`` is the only way our
code reads one; it turns bad UTF-8, invalid JSON, a JSON value of the wrong type at any key, or a
missing required key into the layer's `CorruptFile` error, ``corrupt file PATH: why``, naming the
first offending key. ``to_json`` is the only way one is written. Keys this version does not know are
kept (a newer writer's additions survive a round trip) but never read.

Records are read by attribute. ``record["key"]`` gives the JSON view of a key, for scripts and
notebooks that treat the files as plain JSON; the pipeline's own code does not use it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import CorruptFile


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


def describe(exc: ValidationError) -> str:
    """The first problem of a validation error, in words: ``key a.b[0]: Input should be …``."""
    first = exc.errors(include_url=False)[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    if first["type"] == "missing":
        return f"missing key {_where(loc)}"
    got = type(first.get("input")).__name__ if "input" in first else "?"
    return f"key {_where(loc)}: {first['msg'].lower()} (got {got})"


class Record(BaseModel):
    """A typed JSON file. Subclasses set ``error`` to their layer's CorruptFile class."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=False, validate_assignment=False)
    error: ClassVar[type[CorruptFile]] = CorruptFile

    @classmethod
    def from_dict(cls, data: Any, path: str = "(record)"):
        if not isinstance(data, dict):
            raise cls.error(path, f"expected a JSON object, got {_json_type(data)}")
        try:
            record = cls.model_validate(data)
        except ValidationError as exc:
            raise cls.error(path, describe(exc)) from None
        record.check(path)
        return record

    @classmethod
    def from_json(cls, data: bytes | str, path: str = "(record)"):
        """Parse the bytes of a file; every defect is ``corrupt file PATH: why``."""
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise cls.error(path, f"not UTF-8 (byte {exc.start})") from None
        if not data.strip():
            raise cls.error(path, "empty (truncated, or never finished)")
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as exc:
            raise cls.error(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}; "
                                  f"truncated or edited)") from None
        return cls.from_dict(raw, path)

    def check(self, path: str) -> None:
        """Rules across keys (override); raise ``self.error(path, why)``."""

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False) + "\n"

    def __getitem__(self, key: str):
        """The JSON view of one key (for scripts; pipeline code reads attributes)."""
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
