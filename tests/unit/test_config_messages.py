"""Config mistakes that YAML or a typo would hide: a key given twice, a misspelt key."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def test_a_key_given_twice_is_an_error_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n  seq_len: 32\n  max_steps: 20\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'max_steps' is given twice (lines 2 and 4)" in msg and str(path) in msg and "\n" not in msg


def test_the_same_key_in_two_sections_is_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seed: 3\ndata:\n  dedup:\n    seed: 3\n")
    cfg = load_config(path)
    assert cfg.train.seed == 3 and cfg.data.dedup.seed == 3


@pytest.mark.parametrize(("override", "suggestion"), [
    ("train.micro_batch_size=4", "did you mean train.micro_batch_size_per_gpu?"),
    ("optim.lrr=1e-3", "did you mean optim.lr?"),
    ("trian.max_steps=3", "did you mean train?"),
    ("data.tokenizer.vocab=100", "did you mean data.tokenizer.vocab_size?"),
])
def test_an_unknown_key_suggests_the_nearest_field(override, suggestion):
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(None, [override])
    assert suggestion in str(err.value)


def test_a_key_with_no_near_field_says_check_the_spelling():
    with pytest.raises(ConfigError, match=r"unknown key \(check the spelling\)"):
        load_config(None, ["train.zzzzzz=1"])
