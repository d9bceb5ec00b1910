"""benchmarks/train_throughput.py --smoke on CPU: every workload kind (GPT-2, BERT, Llama shape) and
every implementation (ours, HF under DeepSpeed ZeRO-2, the plain loop) runs, with compile off, and the
JSON carries every row and field. The numbers themselves mean nothing on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def test_smoke_run_writes_every_row_and_field(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput as tt

    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-4000:]
    doc = json.loads(out.read_text())
    got = [(r["workload"], r["impl"]) for r in doc["rows"]]
    assert got == [(name, impl) for name, w in tt.SMOKE.items() for impl in w.impls]
    for r in doc["rows"]:
        assert set(r) == set(tt.FIELDS)
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["compiled"] is False and r["peak_gib"] is None
        assert (r["plan_estimate_gib"] is not None) == (r["impl"] == tt.OURS)
    assert set(doc["ratios"]) == set(tt.SMOKE)
    assert set(doc["ratios"]["smoke-gpt2"]) == {f"ours/{tt.HF}", f"ours/{tt.PLAIN}"}
    assert doc["peak_tflops"] == 989.4
    assert "ours/" in done.stdout and "tokens/s" in done.stdout


def test_unknown_workload_is_a_one_line_error(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput as tt

    assert tt.main(["--workload", "gpt2-9b"]) == 2
    assert "--workload: unknown gpt2-9b; choose from gpt2-124m" in capsys.readouterr().err
