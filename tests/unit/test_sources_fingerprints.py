"""Which config fields re-run which `pretrain prepare` stages (stage fingerprints, pipeline/data/stages.py)."""

import pytest

from pipeline.config import DataConfig
from pipeline.data.sources import list_source_files
from pipeline.data.stages import fingerprints, load_stage, save_stage

pytestmark = pytest.mark.unit


def _fps(cfg: DataConfig) -> dict:
    files = [f for i, s in enumerate(cfg.sources) for f in list_source_files(s, i)]
    return fingerprints(cfg, files)


@pytest.fixture
def base(tmp_path) -> DataConfig:
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    return DataConfig(sources=[{"path": str(tmp_path / "a.jsonl")}])


@pytest.mark.parametrize(("change", "rerun"), [
    ({"validation_fraction": 0.2}, {"shards"}),
    ({"shard_max_tokens": 4096}, {"shards"}),
    ({"num_cpus": 3, "block_bytes": 8192}, set()),
    ({"tokenizer": {"fast_encoder": False}}, set()),
    ({"tokenizer": {"vocab_size": 1000}}, {"tokenizer", "shards"}),
    ({"clean": {"min_words": 3}}, {"dedup", "tokenizer", "shards"}),
    ({"dedup": {"exact": True}}, {"dedup", "tokenizer", "shards"}),
    ({"dedup": {"threshold": 0.5}}, set()),  # near dedup is off: its knobs do not matter
    ({"dedup": {"near": True, "threshold": 0.5}}, {"dedup", "tokenizer", "shards"}),
])
def test_a_changed_field_reruns_only_the_stages_that_depend_on_it(base, change, rerun):
    before = _fps(base)
    after = _fps(DataConfig(**{**base.model_dump(), **{k: (base.model_dump()[k] | v if isinstance(v, dict) else v)
                                                       for k, v in change.items()}}))
    assert {stage for stage in before if before[stage] != after[stage]} == rerun


def test_source_name_weight_and_content(base, tmp_path):
    before = _fps(base)
    renamed = DataConfig(sources=[{"path": base.sources[0].path, "name": "other", "weight": 3.0}])
    assert {k for k, v in _fps(renamed).items() if v != before[k]} == {"shards"}
    (tmp_path / "a.jsonl").write_text('{"text": "changed"}\n')
    assert all(v != before[k] for k, v in _fps(base).items())


def test_a_given_tokenizer_does_not_depend_on_the_corpus(base, tmp_path):
    (tmp_path / "tok.json").write_text("{}")
    cfg = DataConfig(**{**base.model_dump(), "tokenizer": {"path": str(tmp_path / "tok.json")}})
    other = DataConfig(**{**cfg.model_dump(), "clean": {"min_chars": 5}})
    assert _fps(cfg)["tokenizer"] == _fps(other)["tokenizer"] and _fps(cfg)["shards"] != _fps(other)["shards"]


def test_a_stage_record_is_void_if_its_files_changed(tmp_path):
    (tmp_path / "out.txt").write_text("result")
    save_stage(tmp_path, "demo", "fp1", ["out.txt"], seconds=1.0)
    assert load_stage(tmp_path, "demo", "fp1")["seconds"] == 1.0
    assert load_stage(tmp_path, "demo", "fp2") is None
    (tmp_path / "out.txt").write_text("tampered")
    assert load_stage(tmp_path, "demo", "fp1") is None
