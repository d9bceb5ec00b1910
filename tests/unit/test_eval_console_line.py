"""The line `pretrain eval` prints for a checkpoint carries BERT's masked-token top-1/top-5 accuracy
(GPT's next-token accuracy), rounded, beside loss and perplexity."""

from pipeline.eval.evaluate import _summary
from pipeline.eval.records import EvalRecord


def _record(arch: str) -> EvalRecord:
    scores = {"loss": 2.5, "perplexity": 12.18, "acc_top1": 0.41234, "acc_top5": 0.70211, "samples": 4, "tokens": 90}
    return EvalRecord.from_dict({"step": 8, "arch": arch, "loss": 2.5, "perplexity": 12.18, "seconds": 0.4,
                                 "splits": {"validation": scores}})


def test_bert_eval_line_names_masked_token_top1_and_top5():
    line = _summary(_record("bert"), "RUN/checkpoints/step_00000008/eval.json")
    assert line == ("eval: step 8: validation loss 2.5000, perplexity 12.18, masked-token accuracy top-1 41.2% / "
                    "top-5 70.2% in 0.4s → RUN/checkpoints/step_00000008/eval.json")


def test_gpt_eval_line_names_next_token_accuracy():
    assert "next-token accuracy top-1 41.2% / top-5 70.2%" in _summary(_record("gpt"), "x")
