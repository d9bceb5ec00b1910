"""Zero-shot task files and their scoring: cloze (exact greedy match) and length-normalised choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.eval import EvalError
from pipeline.eval.tasks import load_task, run_task, score_requests
from pipeline.models import build_model

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
V = 32  # vocabulary of the fake models


class NextIsPlusOne(torch.nn.Module):
    """A causal LM that is sure the next token is the current one + 1 (mod V)."""

    def forward(self, x):  # (B, T) -> (B, T, V)
        logits = torch.full((*x.shape, V), -10.0)
        logits.scatter_(2, ((x + 1) % V)[..., None], 10.0)
        return logits


class FavoursZ(torch.nn.Module):
    """Uniform over the vocabulary, except that token ord('z') % V is much likelier."""

    def forward(self, x):
        logits = torch.zeros(*x.shape, V)
        logits[..., ord("z") % V] = 5.0
        return logits


class CharTokenizer:
    """One token per character (ord % V), the interface of tokenizers.Tokenizer.encode."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Enc([ord(c) % V for c in text])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_cloze_text_record_splits_off_the_last_word_with_its_space(tmp_path):
    task = load_task(write_jsonl(tmp_path / "lambada_mini.jsonl", [
        {"text": "Return the absolute value of the argument"},
        {"context": "Close the", "target": "file"},
    ]))
    assert (task.name, task.kind) == ("lambada_mini", "cloze")
    assert task.examples[0] == {"context": "Return the absolute value of the", "target": " argument"}
    assert task.examples[1] == {"context": "Close the", "target": " file"}


@pytest.mark.parametrize("record, message", [
    ({"context": "a", "endings": ["b"], "label": 0}, "at least two"),
    ({"context": "a", "endings": ["b", "c"], "label": 2}, "index into `endings`"),
    ({"context": "a", "endings": ["b", "c"], "label": True}, "index into `endings`"),
    ({"text": "oneword"}, "last word"),
    ({"context": "a"}, "cloze record needs"),
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
])
def test_bad_task_records_are_refused_naming_file_and_line(tmp_path, record, message):
    good = {"context": "a", "endings": ["b", "c"], "label": 0} if "endings" in str(record) else {"text": "a b"}
    path = write_jsonl(tmp_path / "t.jsonl", [good, record])
    with pytest.raises(EvalError, match=message) as err:
        load_task(path)
    assert f"{path}:2" in str(err.value)


def test_a_file_mixing_cloze_and_choice_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"context": "a", "endings": ["b", "c"], "label": 0}])
    with pytest.raises(EvalError, match="mixes cloze and multiple-choice"):
        load_task(path)


def test_missing_and_empty_task_files_are_refused(tmp_path):
    with pytest.raises(EvalError, match="no such file"):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(EvalError, match="no records"):
        load_task(write_jsonl(tmp_path / "empty.jsonl", []))


def test_shipped_task_files_load():
    cloze = load_task(ROOT / "tasks" / "cloze_stdlib.jsonl")
    choice = load_task(ROOT / "tasks" / "choice_stdlib.jsonl")
    assert (cloze.kind, choice.kind) == ("cloze", "choice")
    assert len(cloze.examples) >= 30 and len(choice.examples) >= 20
    assert {e["label"] for e in choice.examples} == {0, 1, 2, 3}  # the answer is not always first


def test_greedy_match_needs_every_token_of_the_continuation():
    model = NextIsPlusOne()
    scores = score_requests(model, [([1, 2, 3], [4, 5, 6]), ([1, 2, 3], [4, 5, 7]), ([9], [10])], max_len=16)
    assert [ok for _, ok in scores] == [True, False, True]
    # log p of a "sure" token: 10 - logsumexp(10, -10 × (V-1))
    sure = 10 - math.log(math.exp(10) + (V - 1) * math.exp(-10))
    assert scores[0][0] == pytest.approx(3 * sure, abs=1e-4)
    assert scores[1][0] < scores[0][0] - 10


def test_batching_and_right_padding_do_not_change_scores():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=32, vocab_size=V)).eval()
    requests = [([1, 2, 3, 4, 5, 6, 7], [8, 9]), ([3], [4]), ([5, 6], [7, 8, 9, 10])]
    together = score_requests(model, requests, max_len=32, batch_size=3)
    alone = [score_requests(model, [r], max_len=32, batch_size=1)[0] for r in requests]
    for (a, ok_a), (b, ok_b) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5) and ok_a == ok_b


def test_long_contexts_keep_their_newest_tokens():
    model = NextIsPlusOne()
    (logp, ok), = score_requests(model, [(list(range(20)), [20, 21])], max_len=4)
    assert ok
    with pytest.raises(EvalError, match="does not fit"):
        score_requests(model, [([1], [2, 3, 4, 5, 6])], max_len=4)


def test_choice_acc_norm_divides_by_bytes_so_long_endings_are_not_penalised(tmp_path):
    # " z" is 2 tokens, " zzzzzzzz" 9: the raw sum prefers the short ending, per byte the long one.
    task = load_task(write_jsonl(tmp_path / "c.jsonl", [{"context": "a", "endings": ["z", "zzzzzzzz"], "label": 1}]))
    m = run_task(task, FavoursZ(), CharTokenizer(), eod_id=0, max_len=32)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "examples": 1}


def test_cloze_task_metrics(tmp_path):
    # with the +1 model and a char tokenizer, "ab" → " " is not "b"+1, so build ids that count up
    task = load_task(write_jsonl(tmp_path / "c.jsonl", [{"context": "ab", "target": "c"}, {"context": "ab", "target": "x"}]))

    class Counting(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return self._Enc({"ab": [1, 2], " c": [3, 4], " x": [3, 9]}[text])

    m = run_task(task, NextIsPlusOne(), Counting(), eod_id=0, max_len=32)
    assert m["acc"] == 0.5 and m["examples"] == 2 and m["ppl"] > 1
