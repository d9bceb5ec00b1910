"""Every check that can run before ranks start runs in the parent `pretrain train`: the device, the
vocabulary, the resume rule, paths, and whether the config trains on what the prepared dataset
holds. Each is refused in one stderr line naming the field and the way out, exit 2 (config) or 1
(the checkpoint cannot continue), within 5 s, and no torchrun or rank is ever started (a tripwire
records every process the CLI starts)."""

from __future__ import annotations

import pytest

from reliability.training_faults import assert_one_line, copy_run, run_cli, spawned, tripwire
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest
from pipeline.train import compat

pytestmark = pytest.mark.e2e

LIMIT_S = 5.0

# (id, --set overrides, exit code, words the one line must contain, needs the reference checkpoints)
CASES = [
    ("fp16-on-cpu", ["train.precision=fp16"], 2, ["train.precision", "fp16 needs a GPU", "bf16"], False),
    ("vocab-below-tokenizer", ["model.vocab_size=100"], 2, ["model.vocab_size (100)", "tokenizer"], False),
    ("tokenizer-path-missing", ["data.tokenizer.path=/nonexistent/tok.json"], 2,
     ["data.tokenizer.path", "/nonexistent/tok.json", "does not exist"], False),
    ("data-vocab-changed", ["data.tokenizer.vocab_size=1024"], 2,
     ["data.tokenizer.vocab_size (prepared 512, config 1024)", "`pretrain prepare` again"], False),
    ("data-validation-share-changed", ["data.validation_fraction=0.2"], 2,
     ["data.validation_fraction", "`pretrain prepare` again"], False),
    ("no-sources", ["data.sources=[]"], 2, ["data.sources is empty", "['docs']"], False),
    ("global-batch-changed", ["train.max_steps=10", "train.global_batch_size=8"], 1,
     ["step_00000008", "train.global_batch_size: checkpoint 4, config 8"], True),
    ("schedule-changed-refused", ["train.max_steps=12", "optim.on_resume_schedule_change=refuse"], 2,
     ["train.max_steps 8 → 12", "on_resume_schedule_change is refuse", "continue", "restart"], True),
]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("overrides, code, words, resumed", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_the_parent_in_one_line_before_any_rank_starts(tiny, reference, tmp_path, overrides, code,
                                                                  words, resumed):
    if resumed:
        cfg, run_dir = copy_run(reference.run_dir, tmp_path, "run")
    else:
        cfg, run_dir = tiny.config(f"parent-{tmp_path.name}")
    env, log = tripwire(tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if resumed else None
    proc, took = run_cli("train", str(cfg), *_sets(overrides), env=env)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert_one_line(proc.stderr, *words)
    assert took < LIMIT_S, f"took {took:.1f}s"
    assert not spawned(log), f"processes were started: {spawned(log)}"
    assert not (run_dir / "metrics.jsonl").exists()
    if resumed:
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("what", ["run_dir", "data.output_dir"])
@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_a_directory_that_is_a_file_is_refused_naming_the_field(tiny, tmp_path, what, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    path = blocker if where == "is-a-file" else blocker / "sub"
    cfg, _ = tiny.config(f"paths-{tmp_path.name}")
    env, log = tripwire(tmp_path)
    proc, took = run_cli("train", str(cfg), "--set", f"{what}={path}", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line(proc.stderr, f"{what}: {path}", "not a directory")
    assert took < LIMIT_S and not spawned(log)
    assert blocker.read_text() == "not a directory\n"


def test_fields_that_only_change_how_data_is_written_are_not_a_mismatch(tiny):
    """The one list (train/compat.py DATA_HOW_FIELDS): executor, CPUs, block and shard sizes, the fast
    encoder, where the dataset lives, and the blend weights (read by training) may differ."""
    cfg, _ = tiny.config("how-fields")
    manifest = read_manifest(tiny.data_dir)
    base = load_config(cfg)
    assert compat.dataset_config_problems(base, manifest) == []
    how = load_config(cfg, ["data.executor=ray", "data.num_cpus=1", "data.block_bytes=8192",
                            "data.local_max_bytes=1", "data.shard_max_tokens=4096",
                            "data.tokenizer.fast_encoder=false",
                            f"data.sources=[{{path: '{tiny.sources}', weight: 3.0}}]"])
    assert compat.dataset_config_problems(how, manifest) == []
    what = load_config(cfg, ["data.tokenizer.min_frequency=3", "data.clean.min_chars=10",
                             "data.sources=[{path: /x/other.jsonl}]"])
    (problem,) = compat.dataset_config_problems(what, manifest)
    assert "data.clean.min_chars" in problem and "data.tokenizer.min_frequency" in problem


def test_plan_reports_the_same_mismatch_as_a_blocking_check(tiny):
    cfg, _ = tiny.config("plan-mismatch")
    proc, _ = run_cli("plan", str(cfg), "--set", "data.tokenizer.vocab_size=1024")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "[FAIL] data" in proc.stdout and "data.tokenizer.vocab_size (prepared 512, config 1024)" in proc.stdout


def test_another_source_list_is_a_warning_not_a_refusal(tiny):
    """Training draws from the prepared sources whatever the config lists (its weights go by name),
    so another list is said by `plan`, and `train` is not refused for it."""
    cfg, _ = tiny.config("plan-sources")
    proc, _ = run_cli("plan", str(cfg), "--set", "data.sources=[{path: /elsewhere/web.jsonl, name: web}]")
    assert proc.returncode == 0, proc.stdout[-2000:]
    (warn,) = [line for line in proc.stdout.splitlines() if line.startswith("[warn] data")]
    assert "['web'] are not the prepared dataset's ['docs']" in warn and "--append" in warn
    manifest = read_manifest(tiny.data_dir)
    assert compat.dataset_config_problems(load_config(cfg, ["data.sources=[{path: /x/web.jsonl}]"]), manifest) == []
