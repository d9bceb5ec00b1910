"""Stage completion records (`.stages/<name>.json`) are typed: one that does not parse is a stage to
run again, never a traceback; `StageContext.run` reuses a record only when it still matches."""

from __future__ import annotations

import pytest

from pipeline.data.stages import DedupRecord, Scope, StageContext, StageRecord, load_stage, save_stage
from pipeline.rundir import DatasetDir

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"fingerprint": 3}', b'{"files": {}}', b"\xff\xfe{}", b"",
                                     b'{"fingerprint": "fp", "files": []}', b'{"fingerprint": "fp"'])
def test_a_malformed_stage_record_means_run_the_stage_again(tmp_path, content):
    key = DatasetDir(tmp_path).stage_record("dedup")
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(content)
    assert load_stage(tmp_path, "dedup", "fp") is None


def test_the_dedup_record_round_trips_its_counts(tmp_path):
    (tmp_path / "duplicates.jsonl").write_text("")
    save_stage(tmp_path, "dedup", "fp", ["duplicates.jsonl"], kind=DedupRecord, seconds=0.5, exact=[1, 0], near=[2, 3])
    record = load_stage(tmp_path, "dedup", "fp", DedupRecord)
    assert isinstance(record, DedupRecord) and (record.exact, record.near, record.seconds) == ([1, 0], [2, 3], 0.5)
    assert set(record.files) == {"duplicates.jsonl"}


def test_a_stage_is_reused_only_when_its_record_matches_and_holds_the_files_asked_for(tmp_path):
    (tmp_path / "out.txt").write_text("result")
    save_stage(tmp_path, "tokenizer", "fp", ["out.txt"], seconds=1.0)
    ran, logged = [], []

    def work(ctx: StageContext) -> StageRecord:
        ran.append(ctx)
        return StageRecord(fingerprint="fp", seconds=2.0)

    ctx = StageContext(None, None, DatasetDir(tmp_path), {"tokenizer": "fp"}, logged.append)
    assert isinstance(ctx.scope, Scope) and not ctx.scope.allow_empty_splits
    assert ctx.run("tokenizer", work).seconds == "reused" and not ran and "reused" in logged[0]
    assert ctx.run("tokenizer", work, files=("other.txt",)).seconds == 2.0 and len(ran) == 1
    ctx.force = True
    assert ctx.run("tokenizer", work).seconds == 2.0 and len(ran) == 2
    ctx.force, ctx.fingerprints = False, {"tokenizer": "changed"}
    assert ctx.run("tokenizer", work).seconds == 2.0 and len(ran) == 3
