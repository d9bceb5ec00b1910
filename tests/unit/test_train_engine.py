"""Our config → the DeepSpeed JSON, and the config checks that fail before any process starts."""

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train.engine import deepspeed_config

pytestmark = pytest.mark.unit


def ds(*overrides, world=2, **kw):
    return deepspeed_config(load_config(None, ["train.global_batch_size=16", "train.micro_batch_size_per_gpu=4",
                                               *overrides]), world, **kw)


def test_batch_geometry_precision_and_clipping():
    d = ds("train.precision=bf16", "optim.grad_clip=0.5")
    assert (d["train_batch_size"], d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"]) == (16, 4, 2)
    assert d["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "fp16" not in d
    assert d["gradient_clipping"] == 0.5 and "optimizer" not in d  # torch AdamW as a client optimizer
    fp16 = ds("train.precision=fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0: dynamic loss scaling


def test_offload_uses_deepspeed_optimizer_block():
    d = ds("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true", "optim.lr=1e-3")
    z = d["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert d["optimizer"]["type"] == "AdamW" and d["optimizer"]["params"]["lr"] == 1e-3
    assert d["optimizer"]["params"]["torch_adam"] is True  # no CUDA here: no C++ op to build


def test_universal_load_and_zero3_bf16_persistence():
    assert ds(load_universal=True)["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in ds()
    assert ds("train.zero_stage=3", "train.precision=bf16")["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "stage3_param_persistence_threshold" not in ds("train.zero_stage=3")["zero_optimization"]


@pytest.mark.parametrize(("overrides", "field"), [
    (["train.zero_stage=0", "train.offload_optimizer=true"], "train.offload_optimizer"),
    (["train.zero_stage=2", "train.offload_params=true"], "train.offload_params"),
    (["train.max_steps=10", "train.stop_at_step=11"], "train.stop_at_step"),
    (["train.spike_action=panic"], "train.spike_action"),
    (["checkpoint.keep_every_steps=0"], "checkpoint.keep_every_steps"),
])
def test_impossible_combinations_fail_at_load_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.split(".")[1]):
        load_config(None, overrides)


def test_global_batch_must_divide_by_micro_times_world():
    with pytest.raises(ConfigError, match="world size"):
        ds(world=3)


def test_fp16_without_a_gpu_fails_naming_the_field():
    import torch

    from pipeline.train.engine import initialize

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed")
    with pytest.raises(ConfigError, match="train.precision"):
        initialize(torch.nn.Linear(2, 2), load_config(None, ["train.precision=fp16"]), 1)
