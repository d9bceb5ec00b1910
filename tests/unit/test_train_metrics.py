"""Speed metrics as pure arithmetic: tokens/s, TFLOP/s per device, MFU, data-wait share, ETA."""

import pytest

from pipeline.train import metrics

pytestmark = pytest.mark.unit


def test_throughput_and_mfu_from_steps_and_flops():
    m = metrics.throughput(steps=10, seconds=5.0, data_seconds=0.5, global_batch=16, seq_len=1024,
                           world_size=8, flops_per_token=6e9, peak=989.0)
    assert m["train/samples_per_s"] == pytest.approx(32.0)
    assert m["train/tokens_per_s"] == pytest.approx(32768.0)
    assert m["train/tflops_per_device"] == pytest.approx(32768 * 6e9 / 8 / 1e12)
    assert m["train/mfu"] == pytest.approx(m["train/tflops_per_device"] / 989.0)
    assert m["train/data_wait_share"] == pytest.approx(0.1) and m["train/step_time_s"] == pytest.approx(0.5)


def test_mfu_is_left_out_without_a_known_peak():
    m = metrics.throughput(steps=1, seconds=1.0, data_seconds=0.0, global_batch=1, seq_len=8, world_size=1,
                           flops_per_token=1.0, peak=None)
    assert "train/mfu" not in m


@pytest.mark.parametrize(("configured", "precision", "device", "want"), [
    (None, "bf16", "NVIDIA H100 80GB HBM3", 989.0),
    (None, "fp32", "NVIDIA H100 80GB HBM3", 494.5),
    (None, "bf16", "NVIDIA A100-SXM4-40GB", 312.0),
    (None, "bf16", None, None),  # CPU: no guess
    (None, "bf16", "Some Future GPU", None),
    (123.0, "bf16", None, 123.0),  # the config wins
])
def test_peak_tflops_lookup(configured, precision, device, want):
    assert metrics.peak_tflops(configured, precision, device) == want


def test_eta_and_console_line():
    assert metrics.format_eta(59) == "0m59s" and metrics.format_eta(3725) == "1h02m"
    assert metrics.format_eta(2 * 86400 + 3600) == "2d01h"
    m = {"train/loss": 2.5, "train/lr": 3e-4, "train/grad_norm": 1.25, "train/tokens_per_s": 12345.0,
         "train/tflops_per_device": 1.5, "train/mfu": 0.42, "train/data_wait_share": 0.03,
         "train/peak_memory_gib": 1.5, "train/skipped_steps": 2}
    line = metrics.console_line(50, 200, m, eta_s=90)
    for part in ("step 50/200 (25%)", "loss 2.5000", "lr 3.00e-04", "12,345 tok/s", "MFU 42.0%", "data 3%",
                 "mem 1.50 GiB", "skipped 2", "ETA 1m30s"):
        assert part in line


def test_meter_counts_steps_and_resets():
    meter = metrics.Meter()
    for loss in (1.0, None, 3.0):
        meter.start_step()
        meter.add_data_time(0.0)
        meter.end_step(loss)
    assert meter.steps == 3 and meter.losses == [1.0, 3.0] and meter.eta_s(10) is not None
    meter.reset()
    assert meter.steps == 0 and meter.losses == [] and metrics.peak_memory_gib() > 0
