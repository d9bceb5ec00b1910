"""`pretrain submit --to slurm` against a real single-node Slurm (tests/services/start_slurm.sh).

Skipped, saying why, where sbatch is missing or no slurmctld answers."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import pretrain

pytestmark = pytest.mark.e2e


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (run tests/services/start_slurm.sh as root to get a local Slurm)"
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if up.returncode != 0 or not up.stdout.strip():
        return f"no Slurm controller answers (start one with tests/services/start_slurm.sh): {up.stderr.strip()}"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_slurm_problem() is not None, reason=str(_slurm_problem()))]

LOCAL = ["--set", f"launch.slurm.python={sys.executable}", "--set", "launch.slurm.cpus_per_task=2",
         "--set", "launch.slurm.time_limit=00:15:00"]


def _sets(trained_run, tmp_path):
    """The session run's corpus and prepared data (prepare finds it up to date), a new run_dir."""
    return trained_run["sets"] + ["--set", f"run_dir={tmp_path / 'run'}", "--set", "train.nproc_per_node=1"]


def _render(tmp_path, sets, *args) -> str:
    out = pretrain("submit", "configs/demo.yaml", "--to", "slurm", "--dry-run", *sets, *args).stdout
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.sbatch"
    path.write_text(out)
    return str(path)


def test_sbatch_test_only_accepts_the_one_and_four_node_scripts(trained_run, tmp_path):
    sets = _sets(trained_run, tmp_path)
    one = _render(tmp_path, sets + LOCAL, "--nodes", "1")
    ok = subprocess.run(["sbatch", "--test-only", one], capture_output=True, text=True)
    assert ok.returncode == 0 and "to start at" in ok.stderr, ok.stderr

    four = _render(tmp_path, sets + LOCAL, "--nodes", "4")
    refused = subprocess.run(["sbatch", "--test-only", four], capture_output=True, text=True)
    # Slurm read `#SBATCH --nodes=4`: this one-node cluster cannot place it...
    assert refused.returncode != 0 and "node configuration is not available" in refused.stderr
    # ...and accepts everything else in the script once the node count fits
    fits = subprocess.run(["sbatch", "--test-only", "--nodes=1", four], capture_output=True, text=True)
    assert fits.returncode == 0, fits.stderr


def test_submit_wait_trains_and_evaluates_through_srun_and_torchrun(trained_run, tmp_path):
    sets = _sets(trained_run, tmp_path)
    done = pretrain("submit", "configs/demo.yaml", "--to", "slurm", "--wait", *sets, *LOCAL, timeout=400)
    assert "Slurm job" in done.stdout and "COMPLETED" in done.stdout, done.stdout
    run_dir = tmp_path / "run"
    final = run_dir / "checkpoints" / "step_00000006"
    assert (final / "COMMIT").is_file() and (final / "eval.json").is_file()
    log = next((run_dir / "slurm").glob("pretrain-demo-*.out")).read_text()
    assert "rendezvous" in log and "world size 1" in log
    assert list((run_dir / "submitted").glob("slurm-*.sbatch"))


def test_schedule_without_scrontab_prints_a_crontab_line(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the Debian build: sbatch, no scrontab
    if shutil.which("scrontab"):
        pytest.skip("this Slurm has scrontab; test_schedule_installs_one_scrontab_entry_per_run covers it")
    out = pretrain("submit", "configs/demo.yaml", "--to", "slurm", "--schedule", "0 */6 * * *",
                   *_sets(trained_run, tmp_path), *LOCAL).stdout
    line = out.strip().splitlines()[-1]
    assert line.startswith("0 */6 * * * sbatch --dependency=singleton --job-name=pretrain-demo ")
    script = line.split()[-1]
    check = subprocess.run(["sbatch", "--test-only", script], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the script it schedules was written and is valid


def test_schedule_installs_one_scrontab_entry_per_run(trained_run, tmp_path):
    if shutil.which("scrontab") is None:
        pytest.skip("scrontab is not installed (Debian's slurm-client does not ship it)")
    before = subprocess.run(["scrontab", "-l"], capture_output=True, text=True)
    sets = _sets(trained_run, tmp_path)
    try:
        for cron in ("0 */6 * * *", "30 2 * * *"):  # a second submit replaces the entry
            out = pretrain("submit", "configs/demo.yaml", "--to", "slurm", "--schedule", cron, *sets, *LOCAL).stdout
            assert "scheduled" in out
        table = subprocess.run(["scrontab", "-l"], capture_output=True, text=True).stdout
        assert table.count("# pretrain-demo begin") == 1
        assert "30 2 * * * sbatch --dependency=singleton --job-name=pretrain-demo" in table
        assert "0 */6" not in table
    finally:
        if before.returncode == 0 and before.stdout.strip():
            restore = tmp_path / "restore.scrontab"
            restore.write_text(before.stdout)
            subprocess.run(["scrontab", str(restore)], check=True)
        else:
            subprocess.run(["scrontab", "-r"], capture_output=True)


def test_each_firing_appends_new_files_and_continues_the_run(tmp_path):
    """What a schedule does at every firing — submit the same job again — through a real Slurm:
    the first job prepares and trains; a file added later is appended by the next job, whose
    training resumes in a new data era; a job with nothing new and the budget reached does nothing."""
    import json

    from conftest import write_corpus
    from pipeline.train import checkpoint as ckpt

    raw, run_dir = tmp_path / "raw", tmp_path / "run"
    write_corpus(raw / "part-0.jsonl", 150)
    sets = ["--set", f"run_dir={run_dir}", "--set", f"data.output_dir={tmp_path / 'data'}",
            "--set", f"data.sources=[{{path: '{raw}', name: docs}}]", "--set", "data.tokenizer.vocab_size=1024",
            "--set", "train.seq_len=64", "--set", "train.micro_batch_size_per_gpu=4",
            "--set", "train.global_batch_size=8", "--set", "checkpoint.save_interval_steps=2",
            "--set", "eval.max_samples=16", "--set", "train.nproc_per_node=1", *LOCAL]

    def fire(max_steps: int) -> str:
        done = pretrain("submit", "configs/demo.yaml", "--to", "slurm", "--wait", *sets,
                        "--set", f"train.max_steps={max_steps}", timeout=400)
        assert "COMPLETED" in done.stdout, done.stdout
        logs = sorted((run_dir / "slurm").glob("pretrain-*.out"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text()

    first = fire(4)
    assert "holds no dataset yet; preparing it" in first
    write_corpus(raw / "part-1.jsonl", 100, start=150)  # new data lands between firings
    second = fire(8)
    assert "append: 1 new input file" in second and "era 1 starts at sample 32" in second
    third = fire(8)
    assert "no new input files" in third and "the budget is spent, nothing to do" in third
    assert "the dataset grew" not in third and "train: world size" not in third
    state = ckpt.latest_committed(run_dir / "checkpoints").trainer_state()
    assert state["step"] == 8 and [e["start"] for e in state["data_eras"]] == [0, 32]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [r["file"] for r in manifest["inputs"]] == [str(raw / "part-0.jsonl"), str(raw / "part-1.jsonl")]
