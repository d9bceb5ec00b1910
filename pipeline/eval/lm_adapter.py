"""lm-evaluation-harness's ``LM`` interface over one of our causal models, in this process.

lm-eval brings the tasks (prompts, filters, metrics, aggregation); this adapter answers its three
kinds of request with the model the eval job has already loaded. Requests are tokenized exactly as
tasks.py tokenizes the built-in zero-shot tasks: every context starts with the end-of-document token
(what precedes a document's first token in training), and a continuation is tokenized on its own
and appended, so the bundled tasks score the same through lm-eval as through ``--tasks``.
Importing this module imports ``lm_eval``: harness.py imports it only once that is installed.
"""

from __future__ import annotations

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM

from pipeline.eval.tasks import Request, score_requests


class CheckpointLM(LM):
    """``model`` (ours, causal) + its ``tokenizers.Tokenizer``; greedy decoding for generate_until."""

    def __init__(self, model, tokenizer, eod_id: int, max_len: int, batch_size: int = 8,
                 device: str | torch.device = "cpu", max_gen_toks: int = 256):
        super().__init__()
        self.model, self._tok, self.eod_id = model, tokenizer, eod_id
        self.max_len, self._batch, self._device, self.max_gen_toks = max_len, batch_size, device, max_gen_toks
        self._vocab = tokenizer.get_vocab_size()  # rows past it pad the embedding, and decode to nothing

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _pair(self, context: str, continuation: str) -> Request:
        # trailing spaces belong to the continuation's first word (" word"), as lm-eval's own models do
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return [self.eod_id] + self._ids(context), self._ids(continuation)

    def _score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        return score_requests(self.model, requests, self.max_len, self._batch, self._device)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy decoding reproduces it) per request."""
        return self._score([self._pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log p(text) of each whole text, in windows of the model's context length."""
        out = []
        for r in requests:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self._ids(r.args[0]), prefix_token=self.eod_id, max_seq_len=self.max_len, context_len=1)]
            out.append(sum(lp for lp, _ in self._score(windows)) if windows else 0.0)
        return out

    @torch.no_grad()
    def _greedy(self, context: list[int], until: list[str], max_new: int) -> str:
        new: list[int] = []
        for _ in range(max_new):
            x = torch.tensor([(context + new)[-self.max_len:]], device=self._device)  # (1, T)
            token = int(self.model(x)[0, -1, : self._vocab].argmax())
            if token == self.eod_id:
                break
            new.append(token)
            if any(stop in self._tok.decode(new) for stop in until):
                break
        text = self._tok.decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (sampling options are ignored)."""
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.append(self._greedy([self.eod_id] + self._ids(context), until,
                                    int(kwargs.get("max_gen_toks", self.max_gen_toks))))
        return out
