import json

import pytest

from pipeline.data.sources import read_jsonl

pytestmark = pytest.mark.unit


def test_every_bad_record_has_a_reason_and_position(tmp_path):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',
        b"\xff\xfe not utf8",
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "x"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        "\ufeff".encode() + json.dumps({"text": "bom and \u0000 nul"}).encode(),
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    records = list(read_jsonl(path, source=3, text_field="text"))
    assert [r.line for r in records] == list(range(1, 9))
    assert [(r.reason or "ok").split(":")[0] for r in records] == [
        "ok", "malformed_json", "invalid_utf8", "not_an_object", "missing_field", "not_a_string",
        "empty_text", "ok",
    ]
    assert records[7].text == "bom and  nul"  # BOM stripped, NUL removed
    assert records[0].text == "good one" and records[0].source == 3
    assert all(r.raw for r in records if r.reason)
