"""The planner's estimate: a pure function of the config, checked against published numbers and
against the properties any memory model must have."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, load_config
from pipeline.models.flops import param_count, train_flops_per_token
from pipeline.plan import (activation_bytes, estimate, logits_bytes, memory_per_gpu, model_state_bytes,
                           state_bytes_per_param)

pytestmark = pytest.mark.unit


def cfg(*sets):
    return load_config(None, ["model.vocab_size=50257", *sets])


def test_zero_paper_figure_1_per_device_model_states():
    # Rajbhandari et al. 2020, figure 1: Ψ = 7.5B, Nd = 64, mixed precision Adam (K = 12)
    psi, nd = 7_500_000_000, 64
    expected_gb = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected_gb.items():
        assert sum(model_state_bytes(psi, "fp16", stage, nd)) / 1e9 == pytest.approx(gb, abs=0.05)


def test_bytes_per_parameter_by_precision_and_stage():
    assert state_bytes_per_param("fp16", 0) == (2, 2, 12)
    assert state_bytes_per_param("fp32", 0) == (4, 4, 8)   # torch AdamW on the fp32 weights themselves
    assert state_bytes_per_param("bf16", 0) == (4, 4, 8)   # autocast: fp32 weights and grads
    assert state_bytes_per_param("bf16", 2) == (4, 4, 12)  # + DeepSpeed's fp32 partition copy
    with pytest.raises(ValueError):
        state_bytes_per_param("int8", 0)


def test_estimate_counts_tokens_flops_and_time():
    c = cfg("train.global_batch_size=64", "train.micro_batch_size_per_gpu=4", "train.seq_len=128",
            "train.max_steps=1000")
    est = estimate(c, world_size=8, mfu=0.5, peak_tflops=100)
    assert est.params == param_count(c.model)
    assert est.flops_per_token == train_flops_per_token(c.model, 128)
    assert est.gradient_accumulation_steps == 2
    assert est.tokens_total == 1000 * 64 * 128
    assert est.seconds == pytest.approx(est.tokens_total * est.flops_per_token / (8 * 100e12 * 0.5))


def test_indivisible_world_size_is_a_config_error():
    with pytest.raises(ConfigError, match="world size"):
        estimate(cfg("train.global_batch_size=16", "train.micro_batch_size_per_gpu=8"), world_size=3)


def test_bf16_halves_the_activations_but_not_the_fp32_residual():
    c = cfg("train.seq_len=128", "train.micro_batch_size_per_gpu=4")
    fp32 = activation_bytes(c.model, 128, 4, "fp32")
    bf16 = activation_bytes(c.model, 128, 4, "bf16")
    assert fp32 / 2 < bf16 < fp32


def test_bert_computes_logits_only_at_masked_positions():
    gpt = cfg("model.arch=gpt")
    bert = load_config(None, ["model.arch=bert", "model.vocab_size=30522", "data.tokenizer.type=wordpiece"])
    per_position_gpt = logits_bytes(gpt.model, 128, 4, "fp32") / gpt.model.padded_vocab_size
    per_position_bert = logits_bytes(bert.model, 128, 4, "fp32") / bert.model.padded_vocab_size
    assert per_position_bert == pytest.approx(0.15 * per_position_gpt, rel=0.01)


shapes = st.fixed_dictionaries({
    "n_layer": st.integers(2, 48), "heads": st.sampled_from([1, 2, 4, 8]), "width": st.integers(1, 32),
    "seq_len": st.sampled_from([64, 128, 512]), "micro": st.integers(1, 8),
    "precision": st.sampled_from(["fp32", "bf16", "fp16"]), "dropout": st.sampled_from([0.0, 0.1]),
})


def _cfg(s, *extra):
    d = s["heads"] * 16 * s["width"]
    return cfg(f"model.n_layer={s['n_layer']}", f"model.n_head={s['heads']}", f"model.d_model={d}",
               f"model.max_seq_len={s['seq_len']}", f"train.seq_len={s['seq_len']}",
               f"train.micro_batch_size_per_gpu={s['micro']}", f"train.global_batch_size={s['micro'] * 64}",
               f"train.precision={s['precision']}", f"model.dropout={s['dropout']}", *extra)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 3), st.sampled_from([1, 2, 4, 8, 64]))
def test_more_ranks_or_a_higher_stage_never_needs_more_memory(s, stage, world):
    c = _cfg(s, f"train.zero_stage={stage}")
    here = memory_per_gpu(c.model, c.train, world)
    assert memory_per_gpu(c.model, c.train, world * 2).total <= here.total
    if stage < 3 and world > 1:
        higher = _cfg(s, f"train.zero_stage={stage + 1}")
        # (stage 1 adds DeepSpeed's fp32 copy, but divided by the world size it still saves memory)
        assert memory_per_gpu(higher.model, higher.train, world).model_states <= here.model_states


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_activation_checkpointing_never_keeps_more_activations(s):
    off, on = _cfg(s), _cfg(s, "model.activation_checkpointing=true")
    assert activation_bytes(on.model, s["seq_len"], s["micro"], s["precision"]) <= activation_bytes(
        off.model, s["seq_len"], s["micro"], s["precision"])


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.05, 1.0), st.sampled_from([1, 2, 8]))
def test_time_is_inverse_in_mfu_and_world_size(s, mfu, world):
    c = _cfg(s)
    base = estimate(c, world, mfu=mfu, peak_tflops=100).seconds
    assert estimate(c, world, mfu=mfu / 2, peak_tflops=100).seconds == pytest.approx(2 * base)
    assert estimate(c, world * 2, mfu=mfu, peak_tflops=100).seconds == pytest.approx(base / 2)


def test_peak_is_the_larger_of_the_backward_and_the_optimizer_step():
    small_batch = cfg("train.seq_len=8", "train.micro_batch_size_per_gpu=1", "train.global_batch_size=1",
                      "train.zero_stage=1")
    m = memory_per_gpu(small_batch.model, small_batch.train, 1)
    assert m.step_buffers > m.activations + m.logits  # tiny batch: the step sets the peak
    assert m.total == m.model_states + m.step_buffers
    big_batch = cfg("train.seq_len=1024", "model.max_seq_len=1024", "train.micro_batch_size_per_gpu=16",
                    "train.global_batch_size=16", "train.zero_stage=1")
    m = memory_per_gpu(big_batch.model, big_batch.train, 1)
    assert m.total == m.model_states + m.activations + m.logits
