"""`pretrain eval|status|report` on a path that is not a run: one line saying what the path is and what
to give; a checkpoint directory stands for its run (real CLI, real files)."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.eval.where import describe, run_dir_of
from pipeline.eval import EvalError

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def paths(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "config.yaml").write_text("run_dir: x\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    cfg = tmp_path / "my-gpt.yaml"
    cfg.write_text(f"base: [gpt2-tiny]\nrun_dir: {run}\n")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    return tmp_path, run


def test_each_kind_of_path_is_named(paths):
    tmp, run = paths
    assert describe(run) is None and describe(run / "checkpoints" / "step_00000004") is None
    assert describe(tmp / "nope") == "does not exist"
    assert describe(tmp / "my-gpt.yaml") == f"is a config file (its run directory: {run})"
    assert "prepared dataset directory" in describe(tmp / "data")
    assert describe(tmp / "notes.txt") == "is a file, not a directory"
    assert "no config.yaml, no checkpoints/ and no manifest.json" in describe(tmp / "empty")
    assert run_dir_of(run / "checkpoints" / "step_00000004", "status") == run
    with pytest.raises(EvalError, match=r"my-gpt.yaml: not a run directory: it is a config file .*`pretrain report` takes a run directory"):
        run_dir_of(tmp / "my-gpt.yaml", "report")


@pytest.mark.parametrize("command", ["eval", "status", "report"])
def test_the_cli_says_what_a_wrong_path_is_in_one_line(paths, command):
    tmp, run = paths
    for path, words in [(tmp / "my-gpt.yaml", f"is a config file (its run directory: {run})"),
                        (tmp / "data", "is a prepared dataset directory"), (tmp / "nope", "does not exist")]:
        proc = _cli(command, str(path))
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(f"pretrain {command}: ") and words in lines[0], lines[0]
        assert "takes a run directory" in lines[0] and "Traceback" not in proc.stderr
