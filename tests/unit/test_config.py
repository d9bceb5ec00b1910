import pytest

from pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def test_demo_config_loads_with_its_base_preset():
    cfg = load_config("configs/demo.yaml")
    assert cfg.model.n_layer == 2 and cfg.model.d_model == 128  # from models/gpt2-tiny.yaml
    assert cfg.train.zero_stage == 2 and cfg.train.nproc_per_node == 2  # demo.yaml wins


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = load_config("configs/demo.yaml", ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "tracking.group=abc"])
    assert cfg.train.max_steps == 7
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.tracking.group == "abc"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("train.zero_stage=7", "train.zero_stage"),
        ("train.precision=fp8", "train.precision"),
        ("optim.lr=fast", "optim.lr"),
        ("model.n_head=3", "model"),  # 128 is not divisible by 3
        ("train.seq_len=4096", "train.seq_len"),
        ("data.sources=[{pth: x}]", "data.sources.0"),
    ],
)
def test_bad_field_fails_at_load_naming_it(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert field in str(err.value)


def test_global_batch_must_divide_by_micro_batch_times_world():
    cfg = load_config("configs/demo.yaml", ["train.global_batch_size=16", "train.micro_batch_size_per_gpu=8"])
    assert cfg.gradient_accumulation_steps(1) == 2
    assert cfg.gradient_accumulation_steps(2) == 1
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.gradient_accumulation_steps(3)


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("configs/demo.yaml", ["train.max_steps"])


def test_bert_needs_wordpiece(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer.type"):
        load_config("configs/demo.yaml", ["model.arch=bert"])
    assert load_config("configs/demo-bert.yaml").data.tokenizer.type == "wordpiece"


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
