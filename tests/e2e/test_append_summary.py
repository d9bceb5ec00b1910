"""The line `prepare --append` ends with names the files this append's quarantined records and
removed duplicates went to (quarantine-append1.jsonl, duplicates-append1.jsonl), with their counts."""

from __future__ import annotations

import pytest

from conftest import write_corpus
from pipeline.config import load_config
from pipeline.data.append import append
from pipeline.data.prepare import prepare

pytestmark = pytest.mark.e2e


def test_the_append_summary_names_its_own_quarantine_file(tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    write_corpus(raw / "a.jsonl", 40)
    cfg = load_config("configs/demo.yaml", [
        f"data.output_dir={data}", f"data.sources=[{{path: '{raw}', name: docs}}]",
        "data.tokenizer.vocab_size=512", "data.executor=local", "data.num_cpus=1"]).data
    prepare(cfg, log=lambda *a: None)
    write_corpus(raw / "b.jsonl", 20, start=40)
    (raw / "b.jsonl").write_text((raw / "b.jsonl").read_text() + "{broken json\n[1]\n")
    lines: list[str] = []
    append(cfg, log=lines.append)
    (done,) = [line for line in lines if line.startswith("append: done: ")]
    assert f"this append's quarantine: 2 in {data / 'quarantine-append1.jsonl'}" in done, done
    assert f"duplicates: 0 in {data / 'duplicates-append1.jsonl'}" in done, done
    assert (data / "quarantine-append1.jsonl").read_text().count('"reason"') == 2
