"""Zero-shot tasks from local jsonl files, scored by a causal LM's log-likelihoods.

Two kinds, told apart by the fields of each record:

- **cloze** (LAMBADA-style): ``{"text": "... last"}`` or ``{"context": "...", "target": "last"}``.
  The model reads the context and must produce the last word: ``acc`` counts an example correct
  when greedy decoding reproduces *every* token of the word; ``ppl`` is exp(-mean log p(word)).
- **choice** (HellaSwag-style): ``{"context": "...", "endings": ["...", ...], "label": 0}``. Each
  ending is scored by log p(ending | context); ``acc`` picks the largest sum, ``acc_norm`` the
  largest sum per UTF-8 byte of the ending (so long endings are not penalised for their length;
  this is lm-eval-harness's ``acc_norm``).

Continuations are tokenized on their own, with their leading space (``" word"``), and appended to
the context's tokens, as lm-eval-harness does. Every context starts with the end-of-document token,
which is what precedes a document's first token in training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.eval import EvalError

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "cloze" | "choice"
    path: Path
    examples: tuple[dict, ...]  # normalised: cloze {context, target}; choice {context, endings, label}


def _cloze(record: dict, where: str) -> dict:
    if "text" in record:
        text = str(record["text"]).rstrip()
        cut = text.rfind(" ")
        if cut <= 0:
            raise EvalError(f"{where}: `text` needs a context and a last word separated by a space")
        return {"context": text[:cut], "target": text[cut:]}
    context, target = record.get("context"), record.get("target")
    if not isinstance(context, str) or not isinstance(target, str) or not target.strip():
        raise EvalError(f"{where}: a cloze record needs `text`, or string `context` and non-empty `target`")
    return {"context": context, "target": target if target[:1].isspace() else " " + target}


def _choice(record: dict, where: str) -> dict:
    context, endings, label = record.get("context"), record.get("endings"), record.get("label")
    if not isinstance(context, str):
        raise EvalError(f"{where}: `context` must be a string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise EvalError(f"{where}: `endings` must be a list of at least two non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise EvalError(f"{where}: `label` must be an index into `endings` (0..{len(endings) - 1}), got {label!r}")
    return {"context": context, "endings": [e if e[:1].isspace() else " " + e for e in endings], "label": label}


def load_task(path: str | Path) -> Task:
    """Read and validate a task file; the task is named after the file (``cloze_stdlib.jsonl`` → cloze_stdlib)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--tasks: no such file: {path}")
    examples, kinds = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object")
        kind = "choice" if "endings" in record else "cloze"
        kinds.add(kind)
        if len(kinds) > 1:
            raise EvalError(f"{where}: mixes cloze and multiple-choice records; use one file per task")
        examples.append(_choice(record, where) if kind == "choice" else _cloze(record, where))
    if not examples:
        raise EvalError(f"{path}: no records")
    return Task(path.stem, kinds.pop(), path, tuple(examples))


@torch.no_grad()
def score_requests(model, requests: list[Request], max_len: int, batch_size: int = 8,
                   device: str | torch.device = "cpu") -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of log p(continuation | context), greedy reproduces it).

    Sequences longer than ``max_len + 1`` tokens lose their oldest context tokens. Batches are padded
    on the right, which a causal model never attends to from earlier positions.
    """
    out: list[tuple[float, bool]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        seqs = []
        for context, continuation in chunk:
            if not continuation or len(continuation) > max_len:
                raise EvalError(f"a continuation of {len(continuation)} tokens does not fit 1..{max_len}")
            seqs.append((context + continuation)[-(max_len + 1):])
        width = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T), right-padded
        for i, s in enumerate(seqs):
            x[i, : len(s) - 1] = torch.tensor(s[:-1])
        logprobs = torch.log_softmax(model(x.to(device)).float(), dim=-1).cpu()  # (B, T, V)
        for i, ((_, continuation), s) in enumerate(zip(chunk, seqs)):
            end = len(s) - 1
            rows = logprobs[i, end - len(continuation) : end]  # (n, V): predictions of the continuation
            target = torch.tensor(continuation)  # (n,)
            total = rows.gather(1, target[:, None]).sum().item()
            out.append((total, bool((rows.argmax(-1) == target).all())))
    return out


def run_task(task: Task, model, tokenizer, eod_id: int, max_len: int, batch_size: int = 8,
             device: str | torch.device = "cpu") -> dict:
    """Score one task; returns its metrics ({acc, ppl} or {acc, acc_norm}) and the example count."""

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    if task.kind == "cloze":
        requests = [([eod_id] + ids(e["context"]), ids(e["target"])) for e in task.examples]
        scores = score_requests(model, requests, max_len, batch_size, device)
        mean_logp = sum(lp for lp, _ in scores) / len(scores)
        return {"acc": sum(ok for _, ok in scores) / len(scores), "ppl": math.exp(min(-mean_logp, 50.0)),
                "examples": len(scores)}
    requests, owners = [], []
    for k, e in enumerate(task.examples):
        context = [eod_id] + ids(e["context"])
        for ending in e["endings"]:
            requests.append((context, ids(ending)))
            owners.append((k, len(ending.encode("utf-8"))))
    scores = score_requests(model, requests, max_len, batch_size, device)
    raw = [[] for _ in task.examples]
    norm = [[] for _ in task.examples]
    for (k, n_bytes), (logp, _) in zip(owners, scores):
        raw[k].append(logp)
        norm[k].append(logp / n_bytes)
    labels = [e["label"] for e in task.examples]
    acc = sum(max(range(len(r)), key=r.__getitem__) == y for r, y in zip(raw, labels)) / len(labels)
    acc_norm = sum(max(range(len(r)), key=r.__getitem__) == y for r, y in zip(norm, labels)) / len(labels)
    return {"acc": acc, "acc_norm": acc_norm, "examples": len(labels)}
