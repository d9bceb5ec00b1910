"""`pretrain eval RUN --lm-eval ...` on a real trained run, offline: a loglikelihood, a multiple-choice
and a generate_until task from local YAML; the scores in eval.json and in the W&B offline record; the
bundled tasks scoring the same through lm-eval as through the built-in scorer; include folders inside
--watch; and a task that cannot be loaded is one line, exit 2, before any model is loaded."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ROOT, pretrain
from helpers.wandb_log import offline_runs, read_run
from test_tracking_resume import copy_run

pytestmark = pytest.mark.e2e

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
TASKS = ROOT / "tasks"


def eval_rows(run) -> list[dict]:
    return [row for p in offline_runs(run) if read_run(p)["run"]["job_type"] == "eval"
            for row in read_run(p)["history"] if "train/step" in row]


def test_lm_eval_task_yamls_score_like_the_builtin_tasks_and_land_in_eval_json_and_wandb(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    yamls = f"{TASKS / 'cloze_stdlib.yaml'},{TASKS / 'choice_stdlib.yaml'}"
    proc = pretrain("eval", str(run), "--checkpoint", "3", "--lm-eval", yamls,
                    "--lm-eval", str(TASKS / "complete_stdlib.yaml"),
                    "--tasks", str(TASKS / "cloze_stdlib.jsonl"), str(TASKS / "choice_stdlib.jsonl"), env=OFFLINE)
    assert "lm-eval cloze_stdlib" in proc.stdout
    record = json.loads((run / "checkpoints" / "step_00000003" / "eval.json").read_text())
    lm, ours = record["lm_eval"], record["tasks"]
    assert set(lm) == {"cloze_stdlib", "choice_stdlib", "complete_stdlib"}
    assert (lm["cloze_stdlib"]["examples"], lm["choice_stdlib"]["examples"], lm["complete_stdlib"]["examples"]) \
        == (40, 25, 40)
    # the same items, the same tokens: the same accuracies both ways
    assert lm["cloze_stdlib"]["acc"] == ours["cloze_stdlib"]["acc"]
    assert lm["cloze_stdlib"]["perplexity"] == pytest.approx(ours["cloze_stdlib"]["ppl"], rel=1e-6)
    assert lm["choice_stdlib"]["acc"] == ours["choice_stdlib"]["acc"]
    assert lm["choice_stdlib"]["acc_norm"] == ours["choice_stdlib"]["acc_norm"]
    assert 0.0 <= lm["complete_stdlib"]["exact_match_first_word"] <= 1.0 and "acc_stderr" in lm["choice_stdlib"]

    (row,) = eval_rows(run)
    assert row["train/step"] == 3
    for task, metrics in lm.items():
        for metric, value in metrics.items():
            if metric != "examples":
                assert row[f"eval/lm_eval/{task}/{metric}"] == pytest.approx(value)
                assert record["metrics"][f"eval/lm_eval/{task}/{metric}"] == pytest.approx(value)


def test_lm_eval_inside_watch_finds_task_names_in_an_include_folder(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    pretrain("eval", str(run), "--watch", "--interval-s", "1", "--lm-eval-include", str(TASKS),
             "--lm-eval", "choice_stdlib", cwd=tmp_path,  # not the repo: the data is found beside the YAML
             env={**OFFLINE, "PYTHONPATH": str(ROOT)})
    for step in (3, 6):
        record = json.loads((run / "checkpoints" / f"step_{step:08d}" / "eval.json").read_text())
        assert record["lm_eval"]["choice_stdlib"]["examples"] == 25
    assert [r["train/step"] for r in eval_rows(run)] == [3, 6]
    assert all("eval/lm_eval/choice_stdlib/acc_norm" in r for r in eval_rows(run))


def test_a_task_that_cannot_be_loaded_is_one_line_exit_2_before_any_model_is_loaded(trained_run, tmp_path):
    run = copy_run(trained_run["run_dir"], tmp_path / "run")
    broken = tmp_path / "broken.yaml"
    broken.write_text((TASKS / "cloze_stdlib.yaml").read_text().replace("cloze_stdlib.jsonl", "gone.jsonl"))
    for spec, named in ((str(broken), str(broken)), (str(tmp_path / "nope.yaml"), "nope.yaml"),
                        ("no_such_lm_eval_task", "no_such_lm_eval_task")):
        t0 = time.monotonic()
        proc = pretrain("eval", str(run), "--lm-eval", f"{TASKS / 'choice_stdlib.yaml'},{spec}", env=OFFLINE,
                        check=False)
        assert proc.returncode == 2, proc.stderr
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain eval:")]
        assert line.startswith("pretrain eval: --lm-eval: cannot load task") and named in line
        assert "Traceback" not in proc.stderr and "eval: step" not in proc.stdout
        assert not list(run.glob("checkpoints/*/eval.json")) and time.monotonic() - t0 < 120
