"""Presets by name from anywhere, `pretrain presets` and `pretrain init`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.presets import format_presets, preset_files, starting_config

pytestmark = pytest.mark.unit


def test_a_config_far_from_the_repo_builds_on_a_preset_by_name(tmp_path):
    far = tmp_path / "home" / "exp"
    far.mkdir(parents=True)
    (far / "my.yaml").write_text("base: [gpt2-tiny]\ntrain: {max_steps: 7}\n")
    cfg = load_config(far / "my.yaml")
    assert cfg.model.n_layer == 2 and cfg.model.d_model == 128 and cfg.train.max_steps == 7


def test_a_preset_path_relative_to_the_bundled_configs_works_from_anywhere(tmp_path):
    (tmp_path / "my.yaml").write_text("base: [models/gpt2-small.yaml]\n")
    assert load_config(tmp_path / "my.yaml").model.n_layer == 12


def test_a_file_beside_the_config_wins_over_a_bundled_one(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gpt2-small.yaml").write_text("model: {n_layer: 5, n_head: 2, d_model: 64}\n")
    (tmp_path / "my.yaml").write_text("base: [models/gpt2-small.yaml]\n")
    assert load_config(tmp_path / "my.yaml").model.n_layer == 5


def test_a_misspelt_preset_name_suggests_the_nearest(tmp_path):
    (tmp_path / "my.yaml").write_text("base: [gpt2-tinny]\n")
    with pytest.raises(ConfigError, match=r"no bundled preset named 'gpt2-tinny' \(did you mean gpt2-tiny"):
        load_config(tmp_path / "my.yaml")


def test_presets_lists_every_bundled_model_with_its_size():
    text = format_presets()
    for name in ("gpt2-tiny", "gpt2-small", "bert-base", "llama-tiny"):
        assert name in preset_files() and name in text
    line = next(l for l in text.splitlines() if l.startswith("gpt2-small "))
    assert "124.4M" in line or "124.5M" in line  # 124M + the padded vocabulary


@pytest.mark.parametrize("model", ["gpt2-small", "bert-base", "llama-tiny"])
def test_init_writes_a_config_that_loads_and_names_the_corpora(tmp_path, model):
    path = tmp_path / "my.yaml"
    path.write_text(starting_config(model, ["corpora/a.jsonl", "corpora/b.parquet"]))
    raw = yaml.safe_load(path.read_text())
    assert raw["base"] == [model] and [s["path"] for s in raw["data"]["sources"]] == ["corpora/a.jsonl",
                                                                                     "corpora/b.parquet"]
    cfg = load_config(path)
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert cfg.data.tokenizer.type == ("wordpiece" if model.startswith("bert") else "bpe")


def test_init_and_presets_through_the_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline.cli", *a], capture_output=True, text=True,
                                    cwd=tmp_path, timeout=120)
    out = run("init", "--model", "gpt2-tiny")
    assert out.returncode == 0 and out.stdout.startswith("# A starting config")
    bad = run("init", "--model", "gpt3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "preset" in bad.stderr
    listed = run("presets")
    assert listed.returncode == 0 and "bert-tiny" in listed.stdout
