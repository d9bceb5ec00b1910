"""What `pretrain train` prints on a real 2-rank run: the start-up phases once, a closing summary,
every line once, and no warning of another library that our own calls trigger (those are kept in
RUN_DIR/logs/third_party.log)."""

import re

import pytest

pytestmark = pytest.mark.e2e

THIRD_PARTY = ("untested optimizer", "FutureWarning", "[WARNING]", "UserWarning", "DeprecationWarning",
               "is deprecated")


def test_start_up_phases_are_said_once_with_their_times(trained_run):
    out = trained_run["train_out"]
    lines = [line for line in out.splitlines() if line.startswith("start-up: ")]
    assert len(lines) == 1, out[-3000:]
    total = float(re.match(r"start-up: ([\d.]+)s to the end of the first step \(", lines[0]).group(1))
    phases = dict((name, float(s)) for name, s in re.findall(r"(?:\(|, )([A-Za-z0-9 ]+?) ([\d.]+)s", lines[0]))
    for name in ("start ranks", "DeepSpeed init", "first step"):
        assert name in phases, lines[0]
    assert abs(sum(phases.values()) - total) < 0.1 * len(phases) + 0.05, lines[0]


def test_the_run_ends_with_a_summary_block(trained_run):
    out, run = trained_run["train_out"], trained_run["run_dir"]
    head = out.index("train finished: step 6, ")
    block = out[head:].splitlines()[:5]
    assert re.match(r"train finished: step 6, [\d.]+M tokens in \d+m \d\ds \(start-up [\d.]+s, steps \d+m \d\ds, "
                    r"checkpoints and validation [\d.]+s\)", block[0]), block
    assert re.match(r"  final loss:   train \d+\.\d{4}, validation \d+\.\d{4}; [\d,]+ tokens/s", block[1]), block
    assert block[2] == f"  checkpoint:   {run / 'checkpoints' / 'step_00000006'}"
    assert block[3] == f"  metrics:      {run / 'metrics.jsonl'}"
    assert block[4] == f"  other libraries' known warnings, kept off the console: {run / 'logs' / 'third_party.log'}"


def test_no_third_party_warning_reaches_the_console_and_the_log_keeps_them(trained_run):
    out, run = trained_run["train_out"], trained_run["run_dir"]
    assert not [line for line in out.splitlines() if any(w in line for w in THIRD_PARTY)], out[-3000:]
    kept = (run / "logs" / "third_party.log").read_text().splitlines()
    assert any("untested optimizer" in line for line in kept), kept
    assert len(kept) == len(set(kept))  # once per rank and message


def test_no_line_of_ours_is_printed_twice(trained_run):
    ours = [line for line in trained_run["train_out"].splitlines()
            if line.startswith(("train:", "step ", "start-up:", "train finished"))]
    assert len(ours) == len(set(ours)), ours


def test_status_and_report_take_a_checkpoint_dir_for_its_run(trained_run):
    import json

    from conftest import pretrain

    run = trained_run["run_dir"]
    ckpt_dir = run / "checkpoints" / "step_00000006"
    by_run = json.loads(pretrain("status", str(run), "--json").stdout)
    by_ckpt = json.loads(pretrain("status", str(ckpt_dir), "--json").stdout)
    by_run.pop("last_log_age_s"), by_ckpt.pop("last_log_age_s")  # seconds since the last log: moves on
    assert by_ckpt == by_run and by_run["step"] == 6
    pretrain("report", str(ckpt_dir))
    assert (run / "report.html").exists() and not (ckpt_dir / "report.html").exists()
