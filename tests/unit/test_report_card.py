"""The report's run card: what was trained, on what, how, for how long, on what hardware."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineConfig
from pipeline.eval.report import run_card, write_png

pytestmark = pytest.mark.unit


def test_run_card_names_model_parameters_blend_hyperparameters_wall_time_and_hardware():
    cfg = PipelineConfig(
        run_name="card", model={"n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 128},
        data={"sources": [{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "weight": 1}]},
        train={"seq_len": 64, "micro_batch_size_per_gpu": 2, "global_batch_size": 8, "max_steps": 10},
        optim={"lr": 1e-3, "warmup_steps": 2})
    metrics = [{"step": 0, "time": 100.0, "world_size": 2},
               {"step": 5, "time": 160.0, "train/loss": 5.0, "train/peak_memory_gib": 0.25},
               {"step": 10, "time": 225.0, "train/loss": 4.0, "train/peak_memory_gib": 0.5}]
    card = dict(run_card(cfg, metrics, {"tokens_done": 5120, "tokens_budget": 5120}, vocab=1000))
    assert card["model"].startswith("gpt, 2 layers × d_model 64, 2 heads") and "vocabulary 1,024" in card["model"]
    assert "M (vocabulary" in card["model"]
    assert card["data blend"] == "a (weight 3), b (weight 1)"
    assert "lr 0.001" in card["optimizer"] and "warmup 2 steps" in card["optimizer"]
    assert "accumulation 2 × world size 2" in card["batch"]
    assert card["wall time"].startswith("2m 05s")
    assert card["hardware"] == "world size 2, peak memory 0.50 GiB per rank"
    assert card["tokens"].startswith("5,120 trained")


def test_run_card_without_a_prepared_dataset_says_the_vocabulary_is_unknown():
    card = dict(run_card(PipelineConfig(), [], {}))
    assert "vocabulary unknown" in card["model"] and card["wall time"] == "unknown"


def test_png_carries_the_run_name_and_a_single_point_starts_the_axis_at_zero(tmp_path):
    from pipeline.eval import report

    drawn = {}
    real = report._draw

    def spy(ax, panel, metrics, records):
        real(ax, panel, metrics, records)
        drawn[panel] = (ax.get_xlim(), ax.get_ylabel())

    report._draw = spy
    try:
        write_png(tmp_path / "r.png", [{"step": 30, "train/loss": 3.0, "train/lr": 1e-3}], [], title="my-run")
    finally:
        report._draw = real
    assert drawn["loss"][0][0] == 0 and drawn["loss"][0][1] >= 30 and drawn["loss"][1].startswith("cross-entropy")
    assert (tmp_path / "r.png").stat().st_size > 10_000
