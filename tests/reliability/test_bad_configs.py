"""Bad configs: every impossible config fails at load, before any process, process group or Ray
runtime starts, with exit code 2 and exactly one stderr line naming the field.

The table runs through ``pipeline.cli.main`` in-process (fast) with every launcher replaced by a
tripwire; two cases also run as real subprocesses for the exit code and the wall time.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import pretrain
from reliability.harness import ROOT, write_config

pytestmark = pytest.mark.unit


def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


# (id, {dotted key: value}, substring the one stderr line must contain)
CASES = [
    # unknown keys, at every level of the tree
    ("unknown-top", {"trian": {"max_steps": 3}}, "trian: unknown key"),
    ("unknown-data", {"data.sourcse": []}, "data.sourcse: unknown key"),
    ("unknown-source", {"data.sources.0.wieght": 2}, "data.sources.0.wieght: unknown key"),
    ("unknown-tokenizer", {"data.tokenizer.vocab": 512}, "data.tokenizer.vocab: unknown key"),
    ("unknown-clean", {"data.clean.min_char": 5}, "data.clean.min_char: unknown key"),
    ("unknown-dedup", {"data.dedup.treshold": 0.5}, "data.dedup.treshold: unknown key"),
    ("unknown-model", {"model.n_layers": 2}, "model.n_layers: unknown key"),
    ("unknown-optim", {"optim.learning_rate": 0.1}, "optim.learning_rate: unknown key"),
    ("unknown-train", {"train.max_stepz": 3}, "train.max_stepz: unknown key"),
    ("unknown-checkpoint", {"checkpoint.every": 3}, "checkpoint.every: unknown key"),
    ("unknown-eval", {"eval.batch": 3}, "eval.batch: unknown key"),
    ("unknown-tracking", {"tracking.entity": "me"}, "tracking.entity: unknown key"),
    ("unknown-launch-ray", {"launch.ray.adress": "http://x"}, "launch.ray.adress: unknown key"),
    ("unknown-launch-slurm", {"launch.slurm.partion": "gpu"}, "launch.slurm.partion: unknown key"),
    ("unknown-launch-k8s", {"launch.k8s.namespce": "ml"}, "launch.k8s.namespce: unknown key"),
    # wrong types
    ("type-int-from-word", {"train.max_steps": "ten"}, "train.max_steps"),
    ("type-int-from-bool", {"train.max_steps": True}, "train.max_steps"),
    ("type-float-from-bool", {"optim.lr": True}, "optim.lr"),
    ("type-betas-length", {"optim.betas": [0.9]}, "optim.betas"),
    ("type-sources-not-list", {"data.sources": "docs.jsonl"}, "data.sources"),
    ("type-section-scalar", {"model": 5}, "model"),
    ("type-run-dir-list", {"run_dir": ["a", "b"]}, "run_dir"),
    # out of range, unknown choices, non-finite
    ("zero-stage", {"train.zero_stage": 4}, "train.zero_stage"),
    ("precision", {"train.precision": "fp8"}, "train.precision"),
    ("lr-negative", {"optim.lr": -1.0}, "optim.lr"),
    ("lr-infinite", {"optim.lr": float("inf")}, "optim.lr"),
    ("grace-infinite", {"checkpoint.preempt_grace_s": float("inf")}, "checkpoint.preempt_grace_s"),
    ("validation-fraction", {"data.validation_fraction": 0.7}, "data.validation_fraction"),
    ("vocab-too-small", {"data.tokenizer.vocab_size": 100}, "data.tokenizer.vocab_size"),
    ("dropout-one", {"model.dropout": 1.0}, "model.dropout"),
    ("seed-negative", {"train.seed": -1}, "train.seed"),
    ("seed-too-large", {"train.seed": 2**64}, "train.seed"),
    ("betas-above-one", {"optim.betas": [1.5, 0.95]}, "optim.betas"),
    ("weight-negative", {"data.sources.0.weight": -1.0}, "data.sources.0.weight"),
    ("weight-zero", {"data.sources.0.weight": 0.0}, "data.sources.0.weight"),
    ("source-name-slash", {"data.sources.0.name": "a/b"}, "data.sources.0.name"),
    ("k8s-namespace", {"launch.k8s.namespace": "Bad_NS"}, "launch.k8s.namespace"),
    ("slurm-time-limit", {"launch.slurm.time_limit": "1 day"}, "launch.slurm.time_limit"),
    ("rdzv-port", {"launch.rdzv_port": 80}, "launch.rdzv_port"),
    ("run-dir-empty", {"run_dir": ""}, "run_dir"),
    ("data-dir-blank", {"data.output_dir": "  "}, "data.output_dir"),
    # impossible combinations of valid values
    ("heads-divide-width", {"model.n_head": 3, "model.d_model": 128}, "n_head"),
    ("seq-len-over-positions", {"train.seq_len": 128, "model.max_seq_len": 64}, "train.seq_len"),
    ("bert-with-bpe", {"model.arch": "bert", "data.tokenizer.type": "bpe"}, "data.tokenizer.type"),
    ("batch-not-multiple-of-micro", {"train.global_batch_size": 10, "train.micro_batch_size_per_gpu": 4},
     "train.global_batch_size"),
    ("batch-not-multiple-of-world", {"train.global_batch_size": 4, "train.micro_batch_size_per_gpu": 2,
                                     "train.nproc_per_node": 4}, "train.global_batch_size"),
    ("duplicate-source-names", {"data.sources": [{"path": "a/docs.jsonl"}, {"path": "b/docs.jsonl"}]},
     "unique"),
    ("stop-past-max", {"train.stop_at_step": 9, "train.max_steps": 8}, "train.stop_at_step"),
    ("offload-params-needs-zero3", {"train.offload_params": True, "train.zero_stage": 2}, "train.offload_params"),
    ("offload-optimizer-needs-zero", {"train.offload_optimizer": True, "train.zero_stage": 0},
     "train.offload_optimizer"),
    ("heartbeat-over-half-lease", {"launch.lock_heartbeat_s": 70.0, "launch.lock_lease_s": 120.0},
     "launch.lock_heartbeat_s"),
    ("dedup-bands-over-perm", {"data.dedup.bands": 200, "data.dedup.num_perm": 128}, "dedup.bands"),
]


@pytest.fixture
def no_launch(monkeypatch):
    """Tripwires: any attempt to start training or Ray fails the test loudly."""
    from pipeline.data import prepare
    from pipeline.launch import local, lock

    def tripwire(*_a, **_k):
        raise AssertionError("a bad config got as far as starting something")

    for module, name in ((local, "run_torchrun"), (local, "run_single_process"), (lock, "run_lock"),
                         (prepare, "prepare"), (prepare, "init_ray")):
        monkeypatch.setattr(module, name, tripwire)


def _run_main(argv: list[str], capsys) -> tuple[int, str, float]:
    from pipeline.cli import main

    capsys.readouterr()
    start = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - start
    return code, capsys.readouterr().err, elapsed


def _assert_nothing_started(tmp_path: Path) -> None:
    assert not (tmp_path / "run").exists(), "run_dir was created"
    assert not (tmp_path / "data").exists(), "data dir was created"
    if "torch.distributed" in sys.modules:
        assert not sys.modules["torch.distributed"].is_initialized(), "a process group was started"
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "a Ray runtime was started"


def _bad_config(tmp_path: Path, changes: dict) -> Path:
    path = write_config(tmp_path / "good.yaml", tmp_path / "run", tmp_path / "data", tmp_path / "docs.jsonl")
    raw = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        _set(raw, key, copy.deepcopy(value))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    return bad


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_the_unchanged_base_config_is_valid(tmp_path):
    from pipeline.config import load_config

    load_config(write_config(tmp_path / "good.yaml", tmp_path / "run", tmp_path / "data", tmp_path / "d.jsonl"))


@pytest.mark.parametrize(("changes", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["train", "prepare"])
def test_bad_config_exits_2_with_one_line_naming_the_field_before_anything_starts(
        tmp_path, capsys, no_launch, changes, field, command):
    if command == "prepare" and "train.nproc_per_node" in changes:
        pytest.skip("the world size only matters to train")
    code, err, elapsed = _run_main([command, str(_bad_config(tmp_path, changes))], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines
    assert lines[0].startswith(f"pretrain {command}: ")
    assert elapsed < 5, f"took {elapsed:.1f}s"
    _assert_nothing_started(tmp_path)


def _write(path: Path, raw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


FILE_CASES = [
    # (id, files to write {relative path: content}, the config to load, substring)
    ("top-level-list", {"c.yaml": "- a\n- b\n"}, "c.yaml", "top level must be a mapping"),
    ("not-yaml", {"c.yaml": "train: [unclosed\n"}, "c.yaml", "not valid YAML"),
    ("base-missing", {"c.yaml": {"base": ["nope.yaml"]}}, "c.yaml", "not found"),
    ("base-cycle", {"c.yaml": {"base": ["d.yaml"]}, "d.yaml": {"base": ["c.yaml"]}}, "c.yaml", "includes itself"),
    ("base-dotdot-escape", {"cfg/c.yaml": {"base": ["../outside.yaml"]}, "outside.yaml": {"run_dir": "x"}},
     "cfg/c.yaml", "outside"),
    ("base-absolute-escape", {"cfg/c.yaml": {"base": ["/etc/hostname"]}}, "cfg/c.yaml", "outside"),
    ("base-symlink-escape", {"cfg/c.yaml": {"base": ["link.yaml"]}, "outside.yaml": {"run_dir": "x"}},
     "cfg/c.yaml", "outside"),
    ("base-nested-escape", {"cfg/c.yaml": {"base": ["sub/d.yaml"]}, "cfg/sub/d.yaml": {"base": ["../../o.yaml"]},
                            "o.yaml": {"run_dir": "x"}}, "cfg/c.yaml", "outside"),
]


@pytest.mark.parametrize(("files", "config", "field"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_exits_2_with_one_line(tmp_path, capsys, no_launch, files, config, field):
    for rel, content in files.items():
        _write(tmp_path / rel, content)
    if "link.yaml" in str(files):
        (tmp_path / "cfg" / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    code, err, _ = _run_main(["train", str(tmp_path / config)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines


def test_base_may_name_bundled_presets_and_files_beside_the_config(tmp_path):
    from pipeline.config import load_config

    _write(tmp_path / "cfg" / "common.yaml", {"train": {"max_steps": 7}})
    cfg = _write(tmp_path / "cfg" / "c.yaml", {"base": ["common.yaml", str(ROOT / "configs/models/gpt2-tiny.yaml")]})
    loaded = load_config(cfg)
    assert loaded.train.max_steps == 7 and loaded.model.n_layer == 2


@pytest.mark.parametrize("override, field", [("train.max_steps", "expected dotted.key=value"),
                                             ("train.max_steps.x=1", "not a section")])
def test_bad_override_exits_2_with_one_line(tmp_path, capsys, no_launch, override, field):
    good = write_config(tmp_path / "good.yaml", tmp_path / "run", tmp_path / "data", tmp_path / "d.jsonl")
    code, err, _ = _run_main(["train", str(good), "--set", override], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and field in err


@pytest.mark.e2e
@pytest.mark.parametrize("changes, field", [({"model.n_layers": 2}, "model.n_layers"),
                                            ({"train.global_batch_size": 4, "train.micro_batch_size_per_gpu": 2,
                                              "train.nproc_per_node": 4}, "train.global_batch_size")])
def test_bad_config_through_the_real_cli_exits_2_fast(tmp_path, changes, field):
    start = time.monotonic()
    proc = pretrain("train", str(_bad_config(tmp_path, changes)), check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
