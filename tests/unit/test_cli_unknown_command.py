"""A mistyped subcommand gets one line naming the nearest real ones, and argparse's usage exit code."""

import subprocess
import sys
from pathlib import Path

from pipeline import cli

ROOT = Path(__file__).resolve().parents[2]


def test_typo_of_train_suggests_train_in_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "trian", "configs/demo.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["pretrain: unknown command `trian`; did you mean `pretrain train`?"]


def test_suggestions_come_from_the_real_subcommands():
    parser = cli.build_parser()
    assert cli.unknown_command(parser, ["evl", "run"]) == "pretrain: unknown command `evl`; did you mean `pretrain eval`?"
    assert "`pretrain prepare`" in cli.unknown_command(parser, ["preapre"])
    assert cli.unknown_command(parser, ["zzzz"]) == "pretrain: unknown command `zzzz`; `pretrain --help` lists the commands"


def test_real_commands_and_options_before_them_pass_through():
    parser = cli.build_parser()
    for argv in (["train", "x.yaml"], ["--local_rank", "3", "train", "x.yaml"], ["--local_rank=1", "eval", "r"],
                 ["--version"], []):
        assert cli.unknown_command(parser, argv) is None, argv
