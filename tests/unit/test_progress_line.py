"""The progress line: carriage-return refreshes ending in one final 100% line on a terminal (a real
pseudo-terminal), plain periodic lines with % and ETA elsewhere; never a line twice."""

import io
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

from pipeline.data.stages import Progress
from pipeline.progress import ProgressLine, fraction_line

ROOT = Path(__file__).resolve().parents[2]


def test_fraction_line_has_percent_and_eta():
    assert fraction_line("shards", 250, 1000, "documents", 5.0) == \
        "shards:  25.0% (250/1,000 documents, 50/s, ETA 0m15s)"
    assert fraction_line("shards", 250, None, "documents", 5.0) == "shards: 250 documents (50/s)"


def test_plain_mode_writes_periodic_lines_with_percent_and_eta_and_no_carriage_return():
    lines = []
    p = Progress("dedup", lines.append, every_s=0.05, total=100, line=ProgressLine(lines.append, every_s=0.05, tty=False))
    for _ in range(10):
        p.update(10)
        time.sleep(0.03)
    p.done()
    assert 2 <= len(lines) <= 9
    assert all("%" in line and "ETA" in line and "\r" not in line for line in lines)
    assert len(set(lines)) == len(lines)  # never a line twice


def test_tty_mode_refreshes_in_place_and_ends_with_one_final_line():
    out = io.StringIO()
    line = ProgressLine(print, out, refresh_s=0.0, tty=True)
    p = Progress("shards", print, total=30, line=line)
    for _ in range(3):
        p.update(10)
    p.done()
    text = out.getvalue()
    assert text.count("\r") >= 3 and text.endswith("\n") and text.count("\n") == 1
    assert text.rsplit("\r", 1)[1].startswith("shards: 100.0% (30/30 documents")


def test_prepare_on_a_pseudo_terminal_refreshes_each_stage_in_place(tmp_path):
    """`pretrain prepare` with stdout on a real pty: each streaming stage's line is refreshed with
    carriage returns and ends with its final line (dedup on, so the later passes know their total)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"text": "document number {i} says {" ".join(str(j) for j in range(i % 50 + 20))}"}}\n'
                              for i in range(3000)))
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "pipeline.cli", "prepare", str(ROOT / "configs" / "demo.yaml"),
           "--set", f"data.sources=[{{path: '{corpus}', text_field: text}}]", "--set", f"data.output_dir={tmp_path / 'out'}",
           "--set", "data.dedup.exact=true", "--set", "data.tokenizer.vocab_size=512", "--set", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode()
    assert "\rshards: 100.0% (3,000/3,000 documents" in text
    assert "\rtokenizer: 100.0%" in text
    for stage in ("shards", "tokenizer"):
        shown = [seg for seg in text.replace("\r\n", "\n").split("\r") if seg.startswith(f"{stage}:")]
        assert shown  # drawn with a carriage return (refreshed in place when the stage lasts long enough)
        assert all("\n" not in seg.rstrip(" ") for seg in shown[:-1])  # overwritten, never printed as lines
        assert shown[-1].startswith(f"{stage}: 100.0%") and "\n" in shown[-1]  # one final line
