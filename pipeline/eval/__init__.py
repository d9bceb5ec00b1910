"""Evaluation jobs: score committed checkpoints, watch a run, and summarise it without W&B.

evaluate.py (loss/perplexity per split and source, MLM accuracy, one checkpoint → eval.json)
tasks.py (zero-shot cloze and multiple-choice tasks from local jsonl) · harness.py (lm-eval-harness tasks)
lm_adapter.py (lm-eval's LM interface over our model, in process)
watch.py (evaluate each new checkpoint exactly once) · report.py (HTML + PNG) · status.py
records.py (EvalRecord, the one type of eval.json / eval/step_N.json; the eval-job lock)
"""


from pipeline.errors import UserError


class EvalError(UserError):
    """Nothing evaluable, or a user mistake: the message names the file, checkpoint or option."""
