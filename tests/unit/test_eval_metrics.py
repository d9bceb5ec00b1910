"""Token metrics (GPT next-token and BERT masked-token), the flat W&B keys, the checkpoint table,
the secret scrubbing of the logged config, and the clear lm-eval message."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import cli
from pipeline.config import PipelineConfig
from pipeline.eval import EvalError
from pipeline.eval.evaluate import checkpoint_table, flat_metrics, spread, token_metrics
from pipeline.eval.harness import require_lm_eval
from pipeline.tracking import REDACTED, is_secret_name, public_config

pytestmark = pytest.mark.unit

V = 10


class RankedModel(torch.nn.Module):
    """Ranks every token by a fixed preference: 0 best, then 1, 2, ... (same at each position)."""

    def forward(self, x):  # (B, T) -> (B, T, V)
        return -torch.arange(V, dtype=torch.float32).expand(*x.shape, V).clone()


class FixedData:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels  # (N, T)

    def batch(self, ids):
        y = self.labels[list(ids)]
        return torch.zeros_like(y), y


def test_top1_top5_and_loss_count_only_labelled_tokens():
    # BERT-style labels: -100 everywhere except masked positions (targets 0, 3, 7; one ignored row)
    labels = torch.tensor([[0, -100, 3], [-100, 7, -100], [-100, -100, -100]])
    m = token_metrics(RankedModel(), FixedData(labels), [0, 1, 2], micro=2, device="cpu")
    assert m["tokens"] == 3 and m["samples"] == 3
    assert m["acc_top1"] == pytest.approx(1 / 3)  # only target 0 is ranked first
    assert m["acc_top5"] == pytest.approx(2 / 3)  # 0 and 3 are in the top five, 7 is not
    logz = math.log(sum(math.exp(-k) for k in range(V)))
    assert m["loss"] == pytest.approx(sum(k + logz for k in (0, 3, 7)) / 3, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_a_batch_without_any_label_is_an_error_not_a_nan():
    with pytest.raises(EvalError, match="no labelled token"):
        token_metrics(RankedModel(), FixedData(torch.full((1, 4), -100)), [0], micro=1, device="cpu")


def test_spread_samples_evenly_and_all_when_fewer():
    assert spread(5, None) == [0, 1, 2, 3, 4] and spread(5, 10) == [0, 1, 2, 3, 4]
    ids = spread(1000, 5)
    assert ids == [0, 250, 500, 749, 999]


def _result(step: int, sources: dict, tasks: dict | None = None) -> dict:
    split = {"loss": 2.0, "perplexity": math.exp(2.0), "acc_top1": 0.3, "acc_top5": 0.6, "sources": sources}
    return {"step": step, "tokens_trained": step * 100, "splits": {"validation": split},
            "tasks": tasks or {}, "lm_eval": {}}


def test_flat_metric_names_per_split_source_and_task():
    one = flat_metrics(_result(5, {"web": {"loss": 2.0, "perplexity": 7.4}}))
    assert set(one) == {"eval/validation/loss", "eval/validation/perplexity", "eval/validation/acc_top1",
                        "eval/validation/acc_top5"}  # one source: no per-source duplicate
    two = flat_metrics(_result(5, {"web": {"loss": 2.0, "perplexity": 7.4}, "code/py": {"loss": 1.0, "perplexity": 2.7}},
                               tasks={"cloze_x": {"acc": 0.5, "ppl": 9.0, "examples": 4}}))
    assert two["eval/validation/source/code_py/loss"] == 1.0
    assert two["eval/task/cloze_x/acc"] == 0.5 and "eval/task/cloze_x/examples" not in two


def test_checkpoint_table_has_one_row_per_checkpoint_and_every_metric():
    a = {"step": 3, "tokens_trained": 300, "metrics": {"eval/validation/loss": 3.0}}
    b = {"step": 6, "tokens_trained": 600, "metrics": {"eval/validation/loss": 2.0, "eval/task/t/acc": 0.5}}
    columns, rows = checkpoint_table([a, b])
    assert columns == ["step", "tokens_trained", "eval/task/t/acc", "eval/validation/loss"]
    assert rows == [[3, 300, None, 3.0], [6, 600, 0.5, 2.0]]


def test_secret_like_keys_and_env_secret_values_never_reach_the_logged_config(monkeypatch):
    secret = "wandb-key-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = PipelineConfig(run_name=f"oops-{secret}", tracking={"project": "p"})
    logged = public_config(cfg)
    assert secret not in repr(logged)
    assert logged["run_name"] == REDACTED
    assert "tokenizer" in logged["data"] and "shard_max_tokens" in logged["data"]  # not secrets
    assert is_secret_name("WANDB_API_KEY") and is_secret_name("hf_token") and is_secret_name("db.password")
    assert not is_secret_name("tokenizer") and not is_secret_name("warmup_tokens")


def test_lm_eval_missing_gives_a_clear_message(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(EvalError, match=r"pip install 'lm-eval\[hf\]"):
        require_lm_eval()
    # through the CLI: refused before any checkpoint is looked for
    assert cli.main(["eval", str(tmp_path / "no-such-run"), "--lm-eval", "hellaswag"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "lm-evaluation-harness, which is not installed" in err and "no committed checkpoint" not in err


def test_bert_masked_lm_metrics_use_the_training_masks_and_only_masked_positions(tmp_path):
    import numpy as np

    from pipeline.config import ModelConfig
    from pipeline.data.loader import BERTSamples
    from pipeline.data.shards import ShardWriter
    from pipeline.models import build_model

    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eod": 3}
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "val", np.uint16) as w:
        for _ in range(6):
            w.add_document(list(rng.integers(5, 40, size=30)) + [3])
    data = BERTSamples(tmp_path / "val", 16, seed=7, special=special, vocab_size=40)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="bert", n_layer=1, n_head=2, d_model=16, max_seq_len=16, vocab_size=40,
                                    layer_norm_eps=1e-12)).eval()
    ids = list(range(len(data)))
    m = token_metrics(model, data, ids, micro=4, device="cpu")
    _, labels = data.batch(ids)
    assert m["tokens"] == int((labels != -100).sum()) > 0  # only the masked ~15%
    again = token_metrics(model, data, ids, micro=3, device="cpu")  # masks: a function of (seed, id)
    assert again["tokens"] == m["tokens"] and again["acc_top1"] == m["acc_top1"]
    assert again["loss"] == pytest.approx(m["loss"], rel=1e-6)
    with torch.no_grad():
        x, y = data.batch(ids)
        assert m["loss"] == pytest.approx(model(x, y).item(), rel=1e-4)  # the model's own MLM loss
    assert 0 <= m["acc_top1"] <= m["acc_top5"] <= 1
