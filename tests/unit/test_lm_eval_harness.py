"""lm-evaluation-harness through the in-process adapter: the bundled task YAMLs score exactly what the
built-in scorer scores on the same items, tasks load from paths and include folders with their data
found beside them, and a task that cannot be loaded is one ConfigError line naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, TokenizerConfig
from pipeline.data.tokenizer import special_ids, train_tokenizer
from pipeline.eval.harness import load_tasks, metrics_of, rebase_data_files, run_lm_eval
from pipeline.eval.tasks import load_task, run_task
from pipeline.models import build_model

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tasks"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm():
    """A small GPT (random weights) and a BPE tokenizer trained on the task texts themselves."""
    texts = [json.loads(line).get("text") or json.loads(line)["context"]
             for f in ("cloze_stdlib.jsonl", "choice_stdlib.jsonl") for line in (TASKS / f).read_text().splitlines()]
    cfg_tok = TokenizerConfig(type="bpe", vocab_size=300)
    tok = train_tokenizer(texts * 5, cfg_tok)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=tok.get_vocab_size(),
                      pad_vocab_to_multiple_of=8)
    torch.manual_seed(3)
    return build_model(cfg).eval(), tok, special_ids(tok, cfg_tok)["eod"], cfg.max_seq_len


def test_the_bundled_tasks_score_the_same_through_lm_eval_and_the_builtin_scorer(lm):
    model, tok, eod, max_len = lm
    ours = {name: run_task(load_task(TASKS / f"{name}.jsonl"), model, tok, eod, max_len, 4)
            for name in ("cloze_stdlib", "choice_stdlib")}
    theirs = run_lm_eval([str(TASKS / "cloze_stdlib.yaml"), str(TASKS / "choice_stdlib.yaml")], (),
                         model, tok, eod, max_len, 4, "cpu")
    assert theirs["cloze_stdlib"]["examples"] == ours["cloze_stdlib"]["examples"] == 40
    assert theirs["choice_stdlib"]["examples"] == ours["choice_stdlib"]["examples"] == 25
    assert theirs["cloze_stdlib"]["acc"] == ours["cloze_stdlib"]["acc"]
    assert theirs["cloze_stdlib"]["perplexity"] == pytest.approx(ours["cloze_stdlib"]["ppl"], rel=1e-9)
    assert theirs["choice_stdlib"]["acc"] == ours["choice_stdlib"]["acc"]
    assert theirs["choice_stdlib"]["acc_norm"] == ours["choice_stdlib"]["acc_norm"]
    assert 0 < ours["choice_stdlib"]["acc"] < 1 or ours["choice_stdlib"]["acc_norm"] != ours["choice_stdlib"]["acc"]
    assert "acc_stderr" in theirs["choice_stdlib"]  # every metric lm-eval reports


def test_generate_until_runs_greedy_and_stops_at_the_stop_sequence(lm):
    model, tok, eod, max_len = lm
    result = run_lm_eval([str(TASKS / "complete_stdlib.yaml")], (), model, tok, eod, max_len, 4, "cpu")
    assert result["complete_stdlib"]["examples"] == 40
    assert 0.0 <= result["complete_stdlib"]["exact_match_first_word"] <= 1.0

    from pipeline.eval.lm_adapter import CheckpointLM

    class Request:
        def __init__(self, *args):
            self.args = args

    adapter = CheckpointLM(model, tok, eod, max_len)
    free = adapter.generate_until([Request("Return the", {"until": [], "max_gen_toks": 6})])[0]
    assert free and len(tok.encode(free).ids) <= 6
    cut = free[len(free) // 2 :][:1] or free[-1]  # a character it will produce: the text stops before it
    stopped = adapter.generate_until([Request("Return the", {"until": [cut], "max_gen_toks": 6})])[0]
    assert cut not in stopped and free.startswith(stopped)


def test_rolling_loglikelihood_is_the_sum_over_every_token(lm):
    model, tok, eod, max_len = lm
    from pipeline.eval.lm_adapter import CheckpointLM

    class Request:
        def __init__(self, text):
            self.args = (text,)

    text = "Return a new list containing all items from the iterable in ascending order"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) < max_len  # one window: log p(token | end-of-document, the tokens before it)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[eod] + ids[:-1]])).float(), -1)[0]  # (T, V)
    expected = logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
    adapter = CheckpointLM(model, tok, eod, max_len)
    short, long = adapter.loglikelihood_rolling([Request(text), Request(" ".join([text] * 6))])
    assert short == pytest.approx(expected, rel=1e-6)
    assert len(tok.encode(" ".join([text] * 6)).ids) > 2 * max_len and long < 5 * short < 0  # windows add up


def test_tasks_load_by_name_from_an_include_folder_with_data_beside_the_yaml(tmp_path, monkeypatch):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "items.jsonl").write_text((TASKS / "cloze_stdlib.jsonl").read_text())
    yaml_text = (TASKS / "cloze_stdlib.yaml").read_text().replace("cloze_stdlib.jsonl", "items.jsonl")
    (folder / "mine.yaml").write_text(yaml_text.replace("task: cloze_stdlib", "task: my_cloze"))
    monkeypatch.chdir(tmp_path.parent)  # data_files is relative to the YAML, not to the working directory
    (task,) = load_tasks(["my_cloze"], (str(folder),))
    assert task.task_name == "my_cloze" and len(task.eval_docs) == 40


def test_a_task_that_cannot_be_loaded_is_one_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^--lm-eval: cannot load task '.*nope.yaml': no such file$"):
        load_tasks([str(tmp_path / "nope.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text((TASKS / "cloze_stdlib.yaml").read_text().replace("cloze_stdlib.jsonl", "missing.jsonl"))
    with pytest.raises(ConfigError) as err:
        load_tasks([str(TASKS / "choice_stdlib.yaml"), str(broken)])
    assert str(err.value).startswith(f"--lm-eval: cannot load task '{broken}': ") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--lm-eval-include: no such directory"):
        load_tasks(["cloze_stdlib"], (str(tmp_path / "absent"),))


def test_relative_data_files_are_found_beside_the_yaml(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "b.jsonl").write_text("{}")
    cfg = {"dataset_kwargs": {"data_files": {"test": "a.jsonl", "train": ["b.jsonl", "elsewhere.jsonl"]}}}
    out = rebase_data_files(cfg, tmp_path)["dataset_kwargs"]["data_files"]
    assert out == {"test": str(tmp_path / "a.jsonl"), "train": [str(tmp_path / "b.jsonl"), "elsewhere.jsonl"]}
    assert rebase_data_files({"dataset_kwargs": {"data_files": "/abs/x.jsonl"}}, tmp_path) == \
        {"dataset_kwargs": {"data_files": "/abs/x.jsonl"}}
    assert rebase_data_files({"dataset_path": "hellaswag"}, tmp_path) == {"dataset_path": "hellaswag"}


def test_every_finite_number_of_the_results_is_kept_with_its_filter():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4,
                                 "exact_match,strict": 0.25, "exact_match_stderr,strict": "N/A",
                                 "perplexity,none": float("inf")}},
               "n-samples": {"t": {"original": 4, "effective": 4}}}
    assert metrics_of(results) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "exact_match_strict": 0.25, "examples": 4}}
    assert os.environ.get("DISABLE_MULTIPROC") is None  # the harness sets it only while it scores
