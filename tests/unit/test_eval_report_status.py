"""`pretrain status` arithmetic and `pretrain report` rendering, on a hand-made run directory."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, to_yaml
from pipeline.eval import EvalError
from pipeline.eval.records import write_record
from pipeline.eval.report import series, write_report
from pipeline.eval.status import eta_seconds, format_duration, format_status, run_status
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.unit

SEQ, BATCH, MAX_STEPS = 64, 8, 100  # budget: 100 × 8 × 64 = 51,200 tokens


def make_run(tmp_path: Path, steps_logged: int = 40, now: float | None = None) -> Path:
    run, data = tmp_path / "run", tmp_path / "data"
    (run / "checkpoints").mkdir(parents=True)
    data.mkdir()
    cfg = PipelineConfig(run_dir=str(run), run_name="tiny", data={"output_dir": str(data)},
                         train={"seq_len": SEQ, "global_batch_size": BATCH, "micro_batch_size_per_gpu": 4,
                                "max_steps": MAX_STEPS})
    (run / "config.yaml").write_text(to_yaml(cfg))
    (data / "manifest.json").write_text(json.dumps({
        "tokenizer": {"type": "bpe", "vocab_size": 1024},
        "splits": {"train": {"documents": 4321, "tokens": 987654, "sources": {"web": {"documents": 4000, "tokens": 900000},
                                                                              "code": {"documents": 321, "tokens": 87654}}},
                   "validation": {"documents": 55, "tokens": 12345, "sources": {}}},
        "sources": [{"name": "web", "path": "web.jsonl", "records": 4100, "kept": 4000, "quarantined": 100}],
        "quarantine": {"records": 100, "by_reason": {"empty_text": 60, "bad_json": 40}},
    }))
    now = time.time() if now is None else now
    rows = []
    for step in range(0, steps_logged + 1, 10):
        row = {"step": step, "time": now - (steps_logged - step)}
        if step:
            row.update({"train/loss": 5.0 - step / 100, "train/lr": 1e-3, "train/tokens_per_s": 512.0,
                        "train/consumed_samples": step * BATCH, "train/mfu": 0.01})
        if step % 20 == 0:
            row.update({"val/loss": 5.5 - step / 100})
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    for step in (20, 40):
        path = run / "checkpoints" / ckpt.tag_for(step)
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "consumed_samples": step * BATCH,
                                                              "wandb_run_id": "trainid1"}))
        (path / ckpt.COMMIT).write_text("{}")
    write_record(run, {"step": 20, "checkpoint": str(run / "checkpoints" / ckpt.tag_for(20)), "time": now,
                       "tokens_trained": 20 * BATCH * SEQ, "loss": 4.6321, "perplexity": 102.7, "wandb_run_id": "evalid1",
                       "tasks": {"cloze_stdlib": {"acc": 0.125, "ppl": 900.0, "examples": 8}},
                       "metrics": {"eval/validation/loss": 4.6321, "eval/task/cloze_stdlib/acc": 0.125}})
    return run


def test_status_counts_tokens_of_the_budget_and_an_eta_from_recent_speed(tmp_path):
    now = time.time()
    s = run_status(make_run(tmp_path, now=now), now=now)
    assert (s["step"], s["max_steps"]) == (40, MAX_STEPS)
    assert s["tokens_done"] == 40 * BATCH * SEQ and s["tokens_budget"] == MAX_STEPS * BATCH * SEQ
    assert s["progress"] == pytest.approx(0.4)
    assert s["eta_s"] == pytest.approx(60 * BATCH * SEQ / 512.0)  # 60 steps left at 512 tokens/s
    assert s["phase"] == "running" and s["checkpoint"]["step"] == 40
    assert s["last_eval"]["step"] == 20 and s["eval_pending_steps"] == [40]
    assert s["wandb_run_id"] == "trainid1" and s["eval_wandb_run_ids"] == ["evalid1"]
    text = format_status(s)
    assert "20,480 of 51,200 tokens (40.0%)" in text and "ETA 1m 00s" in text and "not evaluated: steps 40" in text


def test_status_says_when_a_run_stopped_logging(tmp_path):
    s = run_status(make_run(tmp_path, now=time.time() - 7200))
    assert s["phase"] == "stopped or stalled" and s["eta_s"] is None


def test_eta_and_duration_formatting():
    assert eta_seconds(100, 100, None) == 0.0 and eta_seconds(0, 100, None) is None
    assert eta_seconds(0, 100, 10.0) == 10.0
    assert format_duration(59) == "0m 59s" and format_duration(3 * 3600 + 60) == "3h 01m"
    assert format_duration(2 * 86400 + 5) == "2d 0h 00m" and format_duration(None) == "unknown"


def test_series_keeps_the_newest_value_of_a_step_logged_twice():
    rows = [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 2, "a": 5.0}, {"step": 3}]
    assert series(rows, "a") == ([1, 2], [1.0, 5.0])


def test_report_is_self_contained_with_plots_numbers_and_the_manifest(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run, log=lambda *a: None)
    page = out.read_text()
    assert out == run / "report.html" and (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r"<svg\b", page)) == 5
    assert len(re.findall(r'<path [^>]*d="M', page)) > 20  # curves drawn, not empty axes
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing is fetched
    assert "<script" not in page
    for number in ("4.6000", "4.6321", "0.1250", "987,654", "87,654", "12,345", "4,321", "evalid1", "trainid1"):
        assert number in page, number
    assert "empty_text: 60" in page and "train/mfu" in page


def test_report_of_a_run_without_metrics_says_so_and_a_non_run_is_refused(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").unlink()
    page = write_report(run, tmp_path / "out" / "r.html", log=lambda *a: None).read_text()
    assert "no data yet" in page and (tmp_path / "out" / "r.png").is_file()
    with pytest.raises(EvalError, match="not a run directory"):
        write_report(tmp_path / "nothing", log=lambda *a: None)
