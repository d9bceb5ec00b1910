"""Optional: EleutherAI's lm-evaluation-harness on a checkpoint, through the transformers export.

``lm_eval`` is not a dependency of this project (it is large, and its tasks download their data from
the Hugging Face Hub). ``require_lm_eval`` fails before any work with what to install.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from pipeline.eval import EvalError


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError(
            "--lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed in this "
            "environment: `pip install 'lm-eval[hf]>=0.4'` (its tasks download their data from the "
            "Hugging Face Hub, so the machine needs network access). The built-in zero-shot tasks "
            "(--tasks FILE.jsonl) need neither."
        )


def run_lm_eval(checkpoint_path: Path, tasks: list[str], device: str, batch_size: int = 8) -> dict:
    """{task: {metric: value}} from ``lm_eval.simple_evaluate`` on the exported model (numbers only)."""
    require_lm_eval()
    import lm_eval

    from pipeline.export import export_hf

    with tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        model_dir = export_hf(checkpoint_path, Path(tmp) / "hf", log=lambda *a: None)
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=list(tasks), batch_size=batch_size, device=device,
        )
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        # keys look like "acc,none" / "acc_stderr,none"; keep the metric name and numbers only
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
