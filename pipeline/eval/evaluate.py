"""`pretrain eval`: score committed checkpoints and log the results beside training.

An eval job is one process (no DeepSpeed) that reads only committed, hash-verified checkpoints and
their ``model.safetensors`` (no unpickling). Per checkpoint it measures, on ``eval.max_samples``
evenly spread samples of each source of each split:

- loss, perplexity and top-1/top-5 accuracy of the predicted tokens: the next token for GPT, the
  masked tokens for BERT (masked exactly as training masks them: seeded by train.seed and sample id);
- GPT only: zero-shot cloze and multiple-choice tasks from local jsonl files (tasks.py);
- GPT only, optionally: lm-evaluation-harness tasks, scored in this process by the same model
  (harness.py says why not through the transformers export).

``score_checkpoint`` is the side-effect-free part (it runs inside a Ray task with ``--ray``);
``EvalSession`` writes the records (records.py) and logs to the run's W&B project and group, in the
one ``eval`` run every eval job of the training run resumes, plotted against the checkpoint's
training step, with a table of every checkpoint and the checkpoint → eval lineage (tracking.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import pipeline
from pipeline.config import ModelConfig, PipelineConfig
from pipeline.data.loader import open_split
from pipeline.data.manifest import Manifest, manifest_sha256, verify_manifest
from pipeline.data.staging import stage_dataset
from pipeline.errors import ConfigError
from pipeline.eval import EvalError
from pipeline.eval.records import (EvalRecord, checkpoint_config, eval_lock, load_records, run_config,
                                   write_record)
from pipeline.models import build_model, load_state_dict_tied
from pipeline.rundir import DatasetDir, RunDir, step_of
from pipeline.train.remote import push_run
from pipeline.storage import open_storage
from pipeline.tracking import STEP_METRIC, Tracker, artifact_name, eval_run_id
from pipeline.train import checkpoint as ckpt
from pipeline.train.compat import dataset_problem
from pipeline.train.records import TrainerState

TABLE_KEY = "eval/checkpoints"
WANDB_JOB_TYPE = "eval"  # the W&B run of the eval jobs: job_type and name suffix


@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...] = ()  # zero-shot task files (jsonl)
    lm_eval_tasks: tuple[str, ...] = ()  # lm-eval-harness task names or task YAML files
    lm_eval_include: tuple[str, ...] = ()  # folders of lm-eval task YAMLs, for names in lm_eval_tasks
    splits: tuple[str, ...] = ("validation", "train")
    device: str | None = None  # None: cuda when available, else cpu


def check_options(options: EvalOptions) -> None:
    """Fail before any model is loaded: unreadable task files, lm-eval missing, an lm-eval task
    that cannot be loaded (loading it reads its data, so a missing file or no network shows here)."""
    from pipeline.eval.tasks import load_task

    for path in options.tasks:
        load_task(path)
    if options.lm_eval_include and not options.lm_eval_tasks:
        raise ConfigError("--lm-eval-include DIR says where --lm-eval finds task names; name the tasks "
                          "with --lm-eval TASK,...")
    if options.lm_eval_tasks:
        from pipeline.eval.harness import load_tasks

        load_tasks(options.lm_eval_tasks, options.lm_eval_include)


def locate(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(run directory, step) of ``pretrain eval PATH``: PATH is a run directory, or one of its
    checkpoint directories (RUN/checkpoints/step_N, which names the step)."""
    from pipeline.eval.where import run_dir_of

    path = Path(path)
    run = RunDir.of_checkpoint(path)
    if run is None:
        if open_storage(path).exists(ckpt.COMMIT):
            raise EvalError(f"{path}: a checkpoint outside a run directory (expected RUN/{RunDir.CHECKPOINTS}/"
                            f"step_N); eval writes its records into the run, so give it the run directory")
        return run_dir_of(path, "eval"), step  # or one line: what the path is instead, and what to give
    own = step_of(path.name)
    if step is not None and step != own:
        raise EvalError(f"{path} is the checkpoint of step {own}, but --checkpoint says {step}; give one of them")
    return run.root, own


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> ckpt.Committed:
    root = RunDir(run_dir).checkpoints
    found = ckpt.committed_checkpoints(root)
    if step is not None:
        found = [c for c in found if c.step == step]
    if not found:
        what = f"at step {step}" if step is not None else "at all"
        raise EvalError(
            f"{run_dir}: no committed checkpoint {what} under {root} "
            f"(a checkpoint counts only once its {ckpt.COMMIT} marker exists)"
        )
    return found[-1]


def load_model(path: Path, model_cfg: ModelConfig, device: str) -> torch.nn.Module:
    """The checkpoint's ``model.safetensors`` (listed in COMMIT, so verified) in a plain model; read
    from its local path, memory-mapped, as a store without local files would stage it first."""
    model = build_model(model_cfg)
    load_state_dict_tied(model, load_file(str(open_storage(path).local_path("model.safetensors"))))
    return model.to(device).eval()


def spread(total: int, n: int | None) -> list[int]:
    """``n`` sample ids spread evenly over ``[0, total)`` (all of them when n is None or larger)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, n).round()})


@torch.no_grad()
def token_metrics(model, data, ids: list[int], micro: int, device: str) -> dict:
    """Loss, perplexity and top-1/top-5 accuracy over every labelled token (labels != -100)."""
    loss_sum, top1, top5, tokens = 0.0, 0, 0, 0
    for start in range(0, len(ids), micro):
        x, y = batch = data.batch(ids[start : start + micro])  # (B, T) each
        docs = getattr(batch, "doc_ids", None)  # data.document_masking: each document scored alone
        extra = {} if docs is None else {"doc_ids": docs.to(device)}
        logits = model(x.to(device), **extra).float()  # (B, T, V)
        picked = (y != -100).to(device)  # (B, T)
        lg, target = logits[picked], y.to(device)[picked]  # (N, V), (N,)
        loss_sum += F.cross_entropy(lg, target, reduction="sum").item()
        best5 = lg.topk(min(5, lg.shape[-1]), dim=-1).indices  # (N, 5)
        top1 += (best5[:, 0] == target).sum().item()
        top5 += (best5 == target[:, None]).any(-1).sum().item()
        tokens += target.numel()
    if not tokens:
        raise EvalError("no labelled token in the evaluated samples")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "acc_top1": top1 / tokens,
            "acc_top5": top5 / tokens, "samples": len(ids), "tokens": tokens}


def split_metrics(model, cfg: PipelineConfig, data_dir: Path, manifest: Manifest, split: str, device: str) -> dict:
    """Metrics of each source of a split, and of the split (token-weighted over its sources)."""
    sources = open_split(data_dir, manifest, split, cfg.train.seq_len, arch=cfg.model.arch, seed=cfg.train.seed,
                         document_masking=cfg.data.document_masking)
    per = {name: token_metrics(model, data, spread(len(data), cfg.eval.max_samples), cfg.eval.micro_batch_size, device)
           for name, data in sources.items()}
    tokens = sum(m["tokens"] for m in per.values())
    out = {k: sum(m[k] * m["tokens"] for m in per.values()) / tokens for k in ("loss", "acc_top1", "acc_top5")}
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return {**out, "samples": sum(m["samples"] for m in per.values()), "tokens": tokens, "sources": per}


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def flat_metrics(result: dict) -> dict[str, float]:
    """The scalars logged to W&B and metrics.jsonl, e.g. eval/validation/loss, eval/task/NAME/acc."""
    out = {}
    for split, m in result["splits"].items():
        for k in ("loss", "perplexity", "acc_top1", "acc_top5"):
            out[f"eval/{split}/{k}"] = m[k]
        if len(m["sources"]) > 1:
            for source, s in m["sources"].items():
                out[f"eval/{split}/source/{_key(source)}/loss"] = s["loss"]
                out[f"eval/{split}/source/{_key(source)}/perplexity"] = s["perplexity"]
    for group, results in (("task", result["tasks"]), ("lm_eval", result["lm_eval"])):
        for task, m in results.items():
            out.update({f"eval/{group}/{_key(task)}/{k}": v for k, v in m.items() if k != "examples"})
    return out


def _verified_inputs(path: Path) -> tuple[ckpt.Committed, TrainerState, PipelineConfig, Manifest]:
    """The checkpoint (hashes checked), its state and config, and its dataset's manifest (hashes
    checked), refused when the dataset is neither the one it was trained on nor grown from it."""
    ckpt.verify_checkpoint(path)
    checkpoint = ckpt.Committed(path, ckpt.committed_step(path))
    state, cfg = checkpoint.state(), checkpoint_config(path)
    if not state.model:
        raise EvalError(f"{path}: its trainer_state.json records no `model` (written by a version before "
                        f"models were recorded); it cannot be evaluated")
    stage_dataset(DatasetDir(cfg.data.output_dir))  # a dataset on an object store: this node's copy first
    data_dir = DatasetDir(cfg.data.output_dir).root
    manifest = verify_manifest(data_dir)
    problem = dataset_problem(state, manifest, manifest_sha256(data_dir))
    if problem:
        raise EvalError(f"{path}: {problem}; the dataset at {data_dir} changed since and did not grow from "
                        f"it with `pretrain prepare --append`")
    return checkpoint, state, cfg, manifest


def score_checkpoint(checkpoint_path: str | Path, options: EvalOptions) -> EvalRecord:
    """Every metric of one committed checkpoint (verified first). Writes nothing."""
    path = Path(checkpoint_path)
    checkpoint, state, cfg, manifest = _verified_inputs(path)
    data_dir = DatasetDir(cfg.data.output_dir).root
    model_cfg = ModelConfig.model_validate(state.model)
    arch = model_cfg.arch
    if arch != "gpt" and (options.tasks or options.lm_eval_tasks):
        raise EvalError(f"--tasks/--lm-eval score a causal LM; {path} is a {arch} checkpoint (masked LM)")
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model = load_model(path, model_cfg, device)
    splits = {s: split_metrics(model, cfg, data_dir, manifest, s, device)
              for s in options.splits if s in manifest.splits}
    scoring = (model, _tokenizer(data_dir, manifest) if options.tasks or options.lm_eval_tasks else None,
               manifest.tokenizer.eod_id, model_cfg.max_seq_len, cfg.eval.micro_batch_size, device)
    tasks = _run_tasks(options.tasks, *scoring)
    lm_eval = {}
    if options.lm_eval_tasks:
        from pipeline.eval.harness import run_lm_eval

        lm_eval = run_lm_eval(options.lm_eval_tasks, options.lm_eval_include, *scoring)
    headline = splits.get("validation") or next(iter(splits.values()))
    result = {
        "step": checkpoint.step, "checkpoint": str(path), "arch": arch,
        "consumed_samples": state.consumed_samples, "train_run_id": state.wandb_run_id,
        "tokens_trained": state.consumed_samples * cfg.train.seq_len,
        "loss": headline["loss"], "perplexity": headline["perplexity"],
        "splits": splits, "tasks": tasks, "lm_eval": lm_eval,
        "time": round(time.time(), 3), "seconds": round(time.time() - t0, 2), "device": device,
        "host": socket.gethostname(), "pid": os.getpid(), "code_version": pipeline.__version__,
    }
    result["metrics"] = flat_metrics(result)
    return EvalRecord.from_dict(result, f"(the eval record of {path})")


def _tokenizer(data_dir: Path, manifest: Manifest):
    from pipeline.data.tokenizer import load_tokenizer

    return load_tokenizer(DatasetDir(data_dir).path(manifest.tokenizer.file))


def _run_tasks(files, model, tokenizer, eod: int, max_len: int, micro: int, device: str) -> dict:
    from pipeline.eval.tasks import load_task, run_task

    return {t.name: run_task(t, model, tokenizer, eod, max_len, micro, device) for t in map(load_task, files)}


@contextlib.contextmanager
def scorer(options: EvalOptions, use_ray: bool = False, ray_address: str | None = None,
           ray_gpus: float = 0.0) -> Iterator[Callable[[Path], EvalRecord]]:
    """``score(checkpoint_path) -> result``: in this process, or as a Ray task (embedded Ray, or the
    cluster at ``ray_address`` / RAY_ADDRESS; the run directory must be on storage the worker sees)."""
    if not use_ray:
        yield lambda path: score_checkpoint(str(path), options)
        return
    import ray

    from pipeline.data.prepare import init_ray

    started = not ray.is_initialized()
    init_ray(address=ray_address)
    remote = ray.remote(num_cpus=1, num_gpus=ray_gpus, max_retries=0)(score_checkpoint)
    try:
        yield lambda path: ray.get(remote.remote(str(path), options))
    finally:
        if started:
            ray.shutdown()


class EvalSession:
    """One eval job's outputs: the records on disk, and the training run's one W&B ``eval`` run (in
    its project and group), resumed by this job: its id is derived from the training run's id
    (`tracking.eval_run_id`), so every eval job and every ``--watch`` restart adds to the same run.
    Rows are plotted against ``train/step``; W&B's own ``_step`` is numbered by the tracker so that no
    two jobs reuse one. The table holds every checkpoint evaluated so far."""

    def __init__(self, run_dir: str | Path, log=print):
        self.run_dir = Path(run_dir)
        self.log = log
        self.tracker: Tracker | None = None

    def _tracker(self, cfg: PipelineConfig, train_run_id: str | None) -> Tracker:
        if self.tracker is None:
            cfg = cfg.model_copy(update={"run_dir": str(self.run_dir)})  # the run may have moved
            self.tracker = Tracker(cfg, RunDir(self.run_dir).eval_metrics, WANDB_JOB_TYPE,
                                   run_id=eval_run_id(train_run_id, self.run_dir), step_metric=STEP_METRIC)
        return self.tracker

    def record(self, result: EvalRecord) -> EvalRecord:
        """Write eval.json (+ the run-level copy), then log the metrics and the checkpoint table."""
        # the run's config, not the checkpoint's: retention may delete the checkpoint any moment now
        tracker = self._tracker(run_config(self.run_dir) or checkpoint_config(Path(result.checkpoint)),
                                result.train_run_id)
        result = result.model_copy(update={"wandb_run_id": tracker.run_id, "wandb_dir": tracker.run_dir})
        written = write_record(self.run_dir, result)
        columns, rows = checkpoint_table(load_records(self.run_dir))
        if result.checkpoint is not None:  # lineage: this checkpoint → this eval → its record
            tracker.use_checkpoint(result.checkpoint, result.train_run_id, self.run_dir)
        tracker.log(result.metrics, step=result.step, tables={TABLE_KEY: (columns, rows)})
        record = RunDir(self.run_dir).eval_record(result.step)
        tracker.log_output(artifact_name("eval", result.train_run_id, self.run_dir), "eval", record.parent,
                           [record.name], result.step, {"loss": result.loss, "perplexity": result.perplexity})
        self.log(_summary(result, written or f"{RunDir(self.run_dir).eval_dir} (retention deleted the "
                                             f"checkpoint meanwhile)"))
        push_run(RunDir(self.run_dir))  # a run on an object store: the records reach it now
        return result

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def _summary(result: EvalRecord, where) -> str:
    val = result.splits.get("validation")
    loss, ppl = (val.loss, val.perplexity) if val else (float("nan"), float("nan"))
    extras = ""
    if val:  # of the tokens scored: BERT's masked ones, GPT's next ones (docs/evaluation.md)
        what = "masked-token" if result.arch == "bert" else "next-token"
        extras += f", {what} accuracy top-1 {100 * val.acc_top1:.1f}% / top-5 {100 * val.acc_top5:.1f}%"
    extras += "".join(f", {name} acc {m['acc']:.3f}" for name, m in result.tasks.items() if "acc" in m)
    for name, m in result.lm_eval.items():
        key = "acc" if "acc" in m else next((k for k in m if k != "examples" and "stderr" not in k), None)
        extras += f", lm-eval {name} {key} {m[key]:.3f}" if key else ""
    return (f"eval: step {result.step}: validation loss {loss:.4f}, perplexity {ppl:.2f}{extras} "
            f"in {result.seconds}s → {where}")


def checkpoint_table(records: list[EvalRecord | dict]) -> tuple[list[str], list[list]]:
    """One row per evaluated checkpoint: step, tokens trained, then every metric (None where absent)."""
    records = [EvalRecord.coerce(r) for r in records]
    keys = sorted({k for r in records for k in r.metrics})
    rows = [[r.step, r.tokens_trained, *(r.metrics.get(k) for k in keys)] for r in records]
    return ["step", "tokens_trained", *keys], rows


def lease_settings(run_dir: str | Path) -> tuple[float, float]:
    cfg = run_config(run_dir)
    launch = cfg.launch if cfg is not None else PipelineConfig().launch
    return launch.lock_lease_s, launch.lock_heartbeat_s


def evaluate(run_dir: str | Path, step: int | None = None, options: EvalOptions = EvalOptions(),
             use_ray: bool = False, ray_address: str | None = None, ray_gpus: float = 0.0,
             log=print) -> EvalRecord:
    """Evaluate one checkpoint (``step``, default the newest committed), even if it was before.
    ``run_dir`` may also be a checkpoint directory of the run (it names the step)."""
    check_options(options)
    run_dir, step = locate(run_dir, step)
    checkpoint = find_checkpoint(run_dir, step)
    session = EvalSession(run_dir, log)
    with eval_lock(run_dir, *lease_settings(run_dir)), scorer(options, use_ray, ray_address, ray_gpus) as score:
        try:
            return session.record(score(checkpoint.path))
        finally:
            session.close()
