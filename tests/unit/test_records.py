"""Every typed record round-trips, and every malformed one is a single "corrupt file X: why" line.

The records are a checkpoint's ``COMMIT`` and ``trainer_state.json``, a dataset's ``manifest.json``
and an eval record. Each is tested twice: through its parser alone, on a table of malformed bytes
(a flipped byte, a truncated file, an empty file, a JSON list, a wrong JSON type at each key, a
missing key), and through the real functions on real directories (`verify_checkpoint`,
`verify_manifest`, `pretrain export`), where a file the load would read but COMMIT does not list is
refused too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.data.manifest import CorruptManifest, Manifest, ManifestError, verify_manifest, write_manifest
from pipeline.errors import CorruptFile
from pipeline.eval.records import CorruptEvalRecord, EvalRecord
from pipeline.rundir import DatasetDir, RunDir
from pipeline.train import checkpoint as ckpt
from pipeline.train.records import CheckpointError, Commit, CorruptCheckpoint, TrainerState

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHA = "ab" * 32

# ---------------------------------------------------------------- one valid example of each record

COMMIT_JSON = {"step": 10, "files": {"model.safetensors": SHA, "trainer_state.json": "cd" * 32}}

STATE_JSON = {
    "step": 10, "consumed_samples": 80, "wandb_run_id": "abc123", "data_manifest_sha256": SHA,
    "segment_start_step": 4,
    "data_segments": [{"start_step": 0, "end_step": 4, "world_size": 2, "sample_digests": ["d0", None]}],
    "skipped_batches": [[16, 24]], "data_eras": [{"start_sample": 0, "manifest_sha256": SHA}],
    "skip_counts": {"nan": 1}, "consecutive_skips": 0, "spike_history": [2.5, 2.25],
    "world_size": 2, "sample_digests": ["e1", "e2"], "zero_stage": 2, "global_batch_size": 8,
    "code_version": "0.1.0", "model": {"arch": "gpt", "n_layer": 2, "d_model": 64, "max_seq_len": 32},
}

MANIFEST_JSON = {
    "format": "megatron-mmidx", "code_version": "0.1.0", "fingerprint": "f" * 16,
    "stage_fingerprints": {"clean": "c" * 16}, "created_unix": 1767225600,
    "executor": {"kind": "local"}, "dtype": "uint16",
    "tokenizer": {"file": "tokenizer.json", "type": "bpe", "vocab_size": 512, "eod_token": "<|endoftext|>",
                  "special_ids": {"eod": 0}},
    "splits": {"train": {"documents": 3, "tokens": 12,
                         "sources": {"web": {"documents": 3, "tokens": 12, "shards": ["train/web-00000"]}}}},
    "sources": [{"name": "web", "path": "corpus/web.jsonl", "format": ["jsonl"], "files": 1, "records": 4,
                 "kept": 3, "quarantined": 1, "tokens": {"train": 12}}],
    "inputs": [{"source": "web", "file": "corpus/web.jsonl", "sha256": SHA}],
    "accounting": {"documents_in": 4, "kept": 3, "quarantined": 1, "deduplicated": 0},
    "quarantine": {"file": "quarantine.jsonl", "records": 1, "by_reason": {"too_short": 1}},
    "dedup": {"file": "duplicates.jsonl", "exact": 0, "near": 0, "config": {"near": False}},
    "lineage": ["9" * 64],
    "appends": [{"generation": 1, "grew_from_manifest_sha256": "9" * 64, "inputs": ["corpus/web2.jsonl"]}],
    "files": {"tokenizer.json": SHA, "train/web-00000.bin": SHA, "train/web-00000.idx": SHA},
}

EVAL_JSON = {  # what `pretrain eval` writes after scoring one checkpoint
    "step": 10, "checkpoint": "/runs/demo/checkpoints/step_00000010", "arch": "gpt",
    "consumed_samples": 80, "tokens_trained": 2560, "loss": 3.25, "perplexity": 25.79,
    "splits": {"validation": {"loss": 3.25, "perplexity": 25.79, "acc_top1": 0.25, "acc_top5": 0.5,
                              "samples": 8, "tokens": 248,
                              "sources": {"web": {"loss": 3.25, "perplexity": 25.79, "acc_top1": 0.25,
                                                  "acc_top5": 0.5, "samples": 8, "tokens": 248}}}},
    "tasks": {"cloze_stdlib": {"acc": 0.5, "ppl": 12.5, "examples": 4}}, "lm_eval": {},
    "time": 1767225600.125, "seconds": 1.5, "device": "cpu", "host": "node0", "pid": 4242,
    "code_version": "0.1.0", "metrics": {"eval/validation/loss": 3.25, "eval/task/cloze_stdlib/acc": 0.5},
    "wandb_run_id": "abc123-eval", "wandb_dir": "/runs/demo/wandb",
}


class Case(typing.NamedTuple):
    record: type
    error: type  # the layer's CorruptFile class
    path: str  # where the file would live (every message must name it)
    valid: dict


CASES = {
    "COMMIT": Case(Commit, CorruptCheckpoint, "/runs/demo/checkpoints/step_00000010/COMMIT", COMMIT_JSON),
    "trainer_state": Case(TrainerState, CorruptCheckpoint, "/runs/demo/checkpoints/step_00000010/trainer_state.json",
                          STATE_JSON),
    "manifest": Case(Manifest, CorruptManifest, "/data/demo/manifest.json", MANIFEST_JSON),
    "eval": Case(EvalRecord, CorruptEvalRecord, "/runs/demo/eval/step_00000010.json", EVAL_JSON),
}


def assert_corrupt_line(exc: BaseException, path, *words: str) -> None:
    """One line that starts ``corrupt file PATH:`` and names every word (the key, the defect)."""
    msg = str(exc)
    assert isinstance(exc, CorruptFile), f"{type(exc).__name__} is not a CorruptFile: {msg}"
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(f"corrupt file {path}: "), msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def assert_contains(view, written, where: str = "") -> None:
    """Every key and value of ``written`` is in ``view`` unchanged (``view`` may add defaults)."""
    if isinstance(written, dict):
        assert isinstance(view, dict), where
        for key, value in written.items():
            assert key in view, f"{where}.{key} was dropped"
            assert_contains(view[key], value, f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(view, list) and len(view) == len(written), where
        for i, (v, w) in enumerate(zip(view, written)):
            assert_contains(v, w, f"{where}[{i}]")
    else:
        assert view == written and type(view) is type(written), f"{where}: {written!r} became {view!r}"


def flip_byte(data: bytes) -> bytes:
    """A byte in the middle replaced by 0xFF, which is never valid UTF-8 (a disk or copy error)."""
    mid = len(data) // 2
    return data[:mid] + b"\xff" + data[mid + 1:]


# ---------------------------------------------------------------- a wrong JSON value for each key

def _accepted(annotation) -> list:
    """The types a field accepts besides null (``int | None`` → [int])."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _kind(annotation) -> str:
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return "boolean"
    if origin in (int, float):
        return "number"
    if origin is str:
        return "string"
    if origin is dict or (isinstance(origin, type) and issubclass(origin, BaseModel)):
        return "object"
    if origin is list:
        return "array"
    return "any"


#: for each kind of field, the wrong value tried first: a string where a number goes, a list where
#: an object goes (the `"files": []` of a hand-edited COMMIT), an object where a list goes
WRONG = {"number": "7", "boolean": "yes", "string": 7, "object": [], "array": {}}


def wrong_value(annotation):
    """A JSON value of a type the field does not accept, or None for a field that takes any JSON."""
    kinds = {_kind(a) for a in _accepted(annotation)}
    if "any" in kinds:
        return None
    for value in (*(WRONG[k] for k in sorted(kinds)), *WRONG.values()):
        if _kind(type(value)) not in kinds:
            return value
    return None


def typed_keys(name: str) -> list[tuple[str, str]]:
    record = CASES[name].record
    return [(name, key) for key, field in record.model_fields.items() if wrong_value(field.annotation) is not None]


def required_keys(name: str) -> list[tuple[str, str]]:
    record = CASES[name].record
    return [(name, key) for key, field in record.model_fields.items() if field.is_required()]


def _pairs(fn) -> list[tuple[str, str]]:
    return [pair for name in CASES for pair in fn(name)]


# ---------------------------------------------------------------- the parsers alone

@pytest.mark.parametrize("name", CASES)
def test_a_valid_record_round_trips_and_its_json_view_is_stable(name):
    case = CASES[name]
    record = case.record.from_dict(case.valid, case.path)
    text = record.to_json()
    again = case.record.from_json(text.encode("utf-8"), case.path)
    assert again == record
    assert again.to_json() == text
    assert json.loads(text) == record.to_dict()
    assert_contains(record.to_dict(), case.valid)  # nothing written is changed or lost


@pytest.mark.parametrize("name", CASES)
def test_keys_a_newer_version_wrote_survive_a_round_trip(name):
    case = CASES[name]
    data = {**case.valid, "added_by_a_newer_version": {"x": [1, 2]}}
    again = case.record.from_json(case.record.from_dict(data, case.path).to_json(), case.path)
    assert again.to_dict()["added_by_a_newer_version"] == {"x": [1, 2]}


@pytest.mark.parametrize("name", CASES)
def test_every_record_has_its_layers_corrupt_file_error(name):
    case = CASES[name]
    assert case.record.error is case.error and issubclass(case.error, CorruptFile)


def _malformed(valid: dict) -> dict[str, tuple[bytes, str]]:
    """Bytes of a broken file, and a word the one-line error must contain."""
    good = json.dumps(valid, indent=1).encode("utf-8")
    return {
        "flipped byte": (flip_byte(good), "UTF-8"),
        "truncated": (good[: len(good) // 2], "not valid JSON"),
        "empty": (b"", "empty"),
        "only whitespace": (b"\n  \n", "empty"),
        "a JSON list": (json.dumps([valid]).encode(), "expected a JSON object, got an array"),
        "a JSON string": (b'"COMMIT"', "expected a JSON object, got a string"),
        "null": (b"null", "expected a JSON object, got null"),
    }


@pytest.mark.parametrize("defect", list(_malformed({})))
@pytest.mark.parametrize("name", CASES)
def test_malformed_bytes_are_one_line_naming_the_file(name, defect):
    case = CASES[name]
    data, word = _malformed(case.valid)[defect]
    with pytest.raises(case.error) as err:
        case.record.from_json(data, case.path)
    assert_corrupt_line(err.value, case.path, word)


@pytest.mark.parametrize(("name", "key"), _pairs(typed_keys))
def test_a_wrong_json_type_at_any_key_is_one_line_naming_the_key(name, key):
    case = CASES[name]
    value = wrong_value(case.record.model_fields[key].annotation)
    data = {**case.valid, key: value}
    with pytest.raises(case.error) as err:
        case.record.from_json(json.dumps(data), case.path)
    assert_corrupt_line(err.value, case.path, f"key {key}", f"(got {type(value).__name__})")


@pytest.mark.parametrize(("name", "key"), _pairs(required_keys))
def test_a_missing_required_key_is_one_line_naming_it(name, key):
    case = CASES[name]
    data = {k: v for k, v in case.valid.items() if k != key}
    with pytest.raises(case.error) as err:
        case.record.from_json(json.dumps(data), case.path)
    assert_corrupt_line(err.value, case.path, f"missing key {key}")


def test_the_tables_cover_the_keys_each_record_relies_on():
    """The wrong-type and missing-key tables are built from the record types: make sure they did
    not come out empty (a field typed ``Any`` would drop out silently)."""
    assert set(required_keys("COMMIT")) == {("COMMIT", "step"), ("COMMIT", "files")}
    assert {("trainer_state", "step"), ("trainer_state", "consumed_samples")} <= set(required_keys("trainer_state"))
    assert {("manifest", k) for k in ("tokenizer", "splits", "files")} <= set(required_keys("manifest"))
    assert ("eval", "step") in set(required_keys("eval"))
    typed = {key for _, key in typed_keys("trainer_state")}
    assert {"wandb_run_id", "data_segments", "skipped_batches", "zero_stage", "model", "spike_history"} <= typed
    assert {"inputs", "lineage", "appends", "accounting", "fingerprint"} <= {k for _, k in typed_keys("manifest")}


NESTED = [  # (record, a change to its valid JSON, the key the error must name)
    ("COMMIT", lambda d: d["files"].__setitem__("model.safetensors", 5), "files.model.safetensors"),
    ("COMMIT", lambda d: d.__setitem__("step", -1), "step"),
    ("COMMIT", lambda d: d.__setitem__("step", True), "step"),
    ("trainer_state", lambda d: d["data_segments"][0].__setitem__("start_step", "0"), "data_segments[0].start_step"),
    ("trainer_state", lambda d: d.__setitem__("skipped_batches", [[24, 16]]), "skipped_batches"),
    ("trainer_state", lambda d: d.__setitem__("consumed_samples", 8.5), "consumed_samples"),
    ("manifest", lambda d: d["tokenizer"].__setitem__("file", 7), "tokenizer.file"),
    ("manifest", lambda d: d["tokenizer"].__setitem__("vocab_size", "512"), "tokenizer.vocab_size"),
    ("manifest", lambda d: d["tokenizer"].pop("file"), "tokenizer.file"),
    ("manifest", lambda d: d["splits"]["train"].__setitem__("sources", []), "splits.train.sources"),
    ("manifest", lambda d: d["splits"]["train"]["sources"]["web"].__setitem__("shards", "train/web-00000"),
     "splits.train.sources.web.shards"),
    ("manifest", lambda d: d["sources"][0].__setitem__("name", 3), "sources[0].name"),
    ("manifest", lambda d: d["appends"][0].__setitem__("generation", "1"), "appends[0].generation"),
    ("manifest", lambda d: d.__setitem__("files", {}), "lists no files"),
    ("eval", lambda d: d["splits"]["validation"].__setitem__("loss", "3.25"), "splits.validation.loss"),
    ("eval", lambda d: d["splits"]["validation"]["sources"]["web"].pop("tokens"),
     "splits.validation.sources.web.tokens"),
    ("eval", lambda d: d["tasks"]["cloze_stdlib"].__setitem__("acc", [0.5]), "tasks.cloze_stdlib.acc"),
]


@pytest.mark.parametrize(("name", "edit", "key"), NESTED, ids=[f"{n}-{k}" for n, _, k in NESTED])
def test_a_wrong_value_inside_a_record_names_its_full_key(name, edit, key):
    case = CASES[name]
    data = json.loads(json.dumps(case.valid))
    edit(data)
    with pytest.raises(case.error) as err:
        case.record.from_json(json.dumps(data), case.path)
    assert_corrupt_line(err.value, case.path, key)


# ---------------------------------------------------------------- checkpoints on disk

CHECKPOINT_FILES = ("model.safetensors", "mp_rank_00_model_states.pt", "config.yaml")


def commit_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint written the way the ranks write one, then committed by `ckpt.commit`."""
    tmp = root / f".tmp-{ckpt.tag_for(step)}"
    tmp.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (tmp / name).write_text(f"{name} at step {step}")
    (tmp / ckpt.TRAINER_STATE).write_text(TrainerState.from_dict({**STATE_JSON, "step": step}).to_json())
    return ckpt.commit(root, tmp, step, keep_last=3)


def rewrite_commit(final: Path, edit) -> None:
    marker = final / ckpt.COMMIT
    data = json.loads(marker.read_text())
    edit(data)
    marker.write_text(json.dumps(data))


BROKEN_COMMITS = {
    "flipped byte": lambda m: m.write_bytes(flip_byte(m.read_bytes())),
    "truncated": lambda m: m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2]),
    "empty": lambda m: m.write_bytes(b""),
    "a JSON list": lambda m: m.write_text(json.dumps([json.loads(m.read_text())])),
    "files is a list": lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "files": []})),
    "step is a string": lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "step": "1"})),
    "no files key": lambda m: m.write_text(json.dumps({"step": 1})),
}


def test_a_committed_checkpoint_verifies(tmp_path):
    final = commit_checkpoint(tmp_path, 1)
    record = ckpt.verify_checkpoint(final)
    assert isinstance(record, Commit) and record.step == 1
    assert sorted(record.files) == sorted((*CHECKPOINT_FILES, ckpt.TRAINER_STATE))


@pytest.mark.parametrize("defect", BROKEN_COMMITS)
def test_verify_checkpoint_refuses_a_broken_commit_in_one_line(tmp_path, defect):
    final = commit_checkpoint(tmp_path, 1)
    BROKEN_COMMITS[defect](final / ckpt.COMMIT)
    with pytest.raises(CorruptCheckpoint) as err:
        ckpt.verify_checkpoint(final)
    assert_corrupt_line(err.value, final / ckpt.COMMIT)
    with pytest.raises(CorruptCheckpoint):  # and the path every load takes
        ckpt.latest_committed(tmp_path)


def test_a_broken_trainer_state_is_one_line_naming_it(tmp_path):
    final = commit_checkpoint(tmp_path, 1)
    state = final / ckpt.TRAINER_STATE
    state.write_text(json.dumps({**STATE_JSON, "data_segments": {"0": 1}}))
    with pytest.raises(CorruptCheckpoint) as err:
        ckpt.committed_checkpoints(tmp_path)[-1].state()
    assert_corrupt_line(err.value, state, "key data_segments")
    with pytest.raises(CorruptCheckpoint, match="trainer_state.json"):
        ckpt.verify_checkpoint(final)  # and its hash no longer matches COMMIT


@pytest.mark.parametrize("planted", ["zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_file_added_after_the_commit_is_refused_naming_it(tmp_path, planted):
    final = commit_checkpoint(tmp_path, 1)
    (final / planted).parent.mkdir(parents=True, exist_ok=True)
    (final / planted).write_bytes(b"not from this run")
    with pytest.raises(CheckpointError) as err:
        ckpt.verify_checkpoint(final)
    assert planted in str(err.value) and ckpt.COMMIT in str(err.value) and "\n" not in str(err.value)


def test_a_file_the_load_reads_but_commit_does_not_list_is_refused(tmp_path):
    final = commit_checkpoint(tmp_path, 1)
    rewrite_commit(final, lambda d: d["files"].pop("model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors.*not listed in COMMIT"):
        ckpt.verify_checkpoint(final)


def test_a_file_listed_in_commit_but_missing_is_refused_naming_it(tmp_path):
    final = commit_checkpoint(tmp_path, 1)
    (final / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: listed in COMMIT but missing"):
        ckpt.verify_checkpoint(final)


@pytest.mark.parametrize("name", [RunDir.EVAL_JSON, f"{RunDir.EVAL_JSON}.tmp"])
def test_the_eval_record_written_after_the_commit_is_not_an_extra_file(tmp_path, name):
    final = commit_checkpoint(tmp_path, 1)
    (final / name).write_text(json.dumps({**EVAL_JSON, "step": 1, "checkpoint": str(final)}))
    assert ckpt.verify_checkpoint(final).step == 1
    assert ckpt.latest_committed(tmp_path).path == final


# ---------------------------------------------------------------- datasets on disk

def tiny_dataset(root: Path) -> Path:
    from pipeline.data.shards import ShardWriter

    (root / "train").mkdir(parents=True)
    with ShardWriter(root / "train" / "a-00000", "uint16") as w:
        w.add_document([1, 2, 3])
    (root / DatasetDir.TOKENIZER).write_text("{}")
    manifest = {"tokenizer": {"file": DatasetDir.TOKENIZER},
                "splits": {"train": {"sources": {"a": {"shards": ["train/a-00000"]}}}}}
    write_manifest(root, manifest, [DatasetDir.TOKENIZER, "train/a-00000.bin", "train/a-00000.idx"])
    return root


def _edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


BROKEN_MANIFESTS = {
    "a JSON list": lambda m: m.write_text(json.dumps([json.loads(m.read_text())])),
    "bad UTF-8": lambda m: m.write_bytes(flip_byte(m.read_bytes())),
    "truncated": lambda m: m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2]),
    "empty": lambda m: m.write_bytes(b""),
    "files is a list": lambda m: _edit(m, lambda d: d.__setitem__("files", [])),
    "files is empty": lambda m: _edit(m, lambda d: d.__setitem__("files", {})),
    "splits is a list": lambda m: _edit(m, lambda d: d.__setitem__("splits", [])),
}


def test_a_written_manifest_verifies_as_a_typed_record(tmp_path):
    manifest = verify_manifest(tiny_dataset(tmp_path / "data"))
    assert isinstance(manifest, Manifest)
    assert manifest.splits["train"].sources["a"].shards == ["train/a-00000"]


@pytest.mark.parametrize("defect", BROKEN_MANIFESTS)
def test_verify_manifest_refuses_a_broken_manifest_in_one_line(tmp_path, defect):
    root = tiny_dataset(tmp_path / "data")
    BROKEN_MANIFESTS[defect](root / DatasetDir.MANIFEST)
    with pytest.raises(CorruptManifest) as err:
        verify_manifest(root)
    assert_corrupt_line(err.value, root / DatasetDir.MANIFEST)


@pytest.mark.parametrize("unlisted", ["train/a-00000.bin", "train/a-00000.idx", DatasetDir.TOKENIZER])
def test_a_file_training_reads_but_the_manifest_does_not_hash_is_refused(tmp_path, unlisted):
    root = tiny_dataset(tmp_path / "data")
    _edit(root / DatasetDir.MANIFEST, lambda d: d["files"].pop(unlisted))
    with pytest.raises(ManifestError) as err:
        verify_manifest(root)
    msg = str(err.value)
    assert str(root / DatasetDir.MANIFEST) in msg and repr(unlisted) in msg and "\n" not in msg


# ---------------------------------------------------------------- the CLI

def test_the_cli_reports_a_corrupt_commit_in_one_line_and_exits_1(tmp_path):
    run = RunDir(tmp_path / "run")
    commit_checkpoint(run.checkpoints, 1)
    newest = commit_checkpoint(run.checkpoints, 2) / ckpt.COMMIT
    newest.write_bytes(flip_byte(newest.read_bytes()))
    env = {k: v for k, v in os.environ.items() if k != "PRETRAIN_DEBUG"}  # debug mode re-raises
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(run.root), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "corrupt file" in lines[0] and str(newest) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
