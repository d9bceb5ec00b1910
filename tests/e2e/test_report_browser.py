"""`pretrain report` rendered by a real headless Chromium with no network: plots drawn, numbers shown.

Chromium comes from tests/services/install_chromium.sh (Debian's `chromium`). The screenshot is kept
under the test's tmp dir and copied to runs/test-artifacts/report-screenshot.png.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, pretrain
from test_tracking_resume import copy_run

pytestmark = pytest.mark.e2e

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no headless browser on PATH (chromium, google-chrome): run tests/services/install_chromium.sh")


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # an unreachable proxy: if the page tried to fetch anything from the network, it would fail
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={profile}", "--proxy-server=http://127.0.0.1:9", "--no-first-run"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_offline_in_headless_chromium(trained_run, tmp_path):
    binary = browser()
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    pretrain("eval", str(run), "--watch", "--interval-s", "1", "--tasks", str(ROOT / "tasks" / "cloze_stdlib.jsonl"))
    status = pretrain("status", str(run)).stdout
    assert "step 6 of 6" in status and "finished" in status and "last eval:   step 6" in status
    pretrain("report", str(run))
    page = run / "report.html"
    assert (run / "report.png").stat().st_size > 20_000

    dom = chromium(binary, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    svgs = re.findall(r"<svg\b.*?</svg>", html, flags=re.S)
    assert len(svgs) == 5
    for svg in svgs:  # every panel has drawn paths (axes, and curves or markers)
        assert len(re.findall(r'<path [^>]*\bd="M[^"]+"', svg)) >= 4
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<script" not in html

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_train = [m for m in metrics if "train/loss" in m][-1]
    record = json.loads((run / "checkpoints" / "step_00000006" / "eval.json").read_text())
    manifest = json.loads((trained_run["data_dir"] / "manifest.json").read_text())
    text = re.sub(r"<[^>]+>", " ", html)
    for number in (f"{last_train['train/loss']:.4f}", f"{record['loss']:.4f}", f"{record['perplexity']:.4f}",
                   f"{record['tasks']['cloze_stdlib']['acc']:.4f}",
                   f"{manifest['splits']['train']['tokens']:,}", f"{manifest['splits']['validation']['documents']:,}"):
        assert number in text, number
    assert "Evaluation per checkpoint" in text and "Quarantined records" in text

    shot = tmp_path / "shot.png"
    taken = chromium(binary, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # text and coloured curves, not a blank page
    artifacts = ROOT / "runs" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, artifacts / "report-screenshot.png")
