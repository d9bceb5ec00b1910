"""`pretrain report`: one self-contained HTML page (inline SVG plots) and a PNG, for people without W&B.

Everything comes from the run directory: metrics.jsonl (training), the eval records (records.py),
config.yaml and the dataset's manifest.json. The page has no script and fetches nothing: it renders
the same from a laptop's file system, an e-mail attachment or an air-gapped cluster.
"""

from __future__ import annotations

import html
import io
import math
import time
from pathlib import Path

from pydantic import Field

from pipeline.data.manifest import CorruptManifest
from pipeline.eval import EvalError
from pipeline.eval.records import EvalRecord, load_records, read_jsonl, run_config
from pipeline.eval.status import run_status
from pipeline.records import Record
from pipeline.rundir import DatasetDir, RunDir
from pipeline.storage import open_storage

PANELS = ("loss", "lr", "throughput", "eval_loss", "eval_acc")
TITLES = {"loss": "Loss", "lr": "Learning rate", "throughput": "Throughput",
          "eval_loss": "Eval loss per checkpoint", "eval_acc": "Eval accuracy per checkpoint"}
YLABELS = {"loss": "cross-entropy (nats/token)", "lr": "learning rate", "throughput": "tokens/s",
           "eval_loss": "cross-entropy (nats/token)", "eval_acc": "accuracy"}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a resumed run) keeps its newest value."""
    last = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float)) and "step" in r}
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def _eval_series(records: list[EvalRecord], key: str) -> tuple[list[int], list[float]]:
    return series([{"step": r.step, **r.metrics} for r in records], key)


def _draw(ax, panel: str, metrics: list[dict], records: list[EvalRecord]) -> None:
    drawn = 0

    def line(xs, ys, label, **kw):
        nonlocal drawn
        if xs:
            ax.plot(xs, ys, label=label, **kw)
            drawn += 1

    eval_keys = sorted({k for r in records for k in r.metrics})
    if panel == "loss":
        line(*series(metrics, "train/loss"), "train/loss")
        line(*series(metrics, "val/loss"), "val/loss (during training)", marker=".")
        line(*_eval_series(records, "eval/validation/loss"), "eval validation loss", marker="o", linestyle="--")
    elif panel == "lr":
        line(*series(metrics, "train/lr"), "train/lr")
    elif panel == "throughput":
        line(*series(metrics, "train/tokens_per_s"), "train/tokens_per_s")
        mfu_key = next((k for r in metrics for k in r if k.endswith("mfu")), None)
        if mfu_key:
            twin = ax.twinx()
            xs, ys = series(metrics, mfu_key)
            twin.plot(xs, ys, color="tab:red", label=mfu_key)
            twin.set_ylabel(mfu_key)
            twin.legend(loc="lower right", fontsize=8)
    elif panel == "eval_loss":
        for key in eval_keys:
            if key.endswith("/loss") and key.count("/") >= 2:
                line(*_eval_series(records, key), key.removeprefix("eval/"), marker="o")
    elif panel == "eval_acc":
        for key in eval_keys:
            if key.endswith(("/acc", "/acc_norm", "/acc_top1", "/acc_top5")):
                line(*_eval_series(records, key), key.removeprefix("eval/"), marker="o")
    ax.set_title(TITLES[panel])
    ax.set_xlabel("training step")
    ax.set_ylabel(YLABELS[panel])
    ax.set_xlim(left=0)  # a single checkpoint at step 30 is drawn on 0…30, not on 28.5…31.5
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")


def panel_svgs(metrics: list[dict], records: list[EvalRecord]) -> dict[str, str]:
    """Each panel as inline SVG markup (text kept as text, ids unique per panel)."""
    import matplotlib
    from matplotlib.figure import Figure

    out = {}
    for panel in PANELS:
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"report-{panel}"}):
            fig = Figure(figsize=(6.4, 3.6), layout="constrained")
            _draw(fig.add_subplot(), panel, metrics, records)
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        text = buf.getvalue()
        out[panel] = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE
    return out


def write_png(path: Path | io.BytesIO, metrics: list[dict], records: list[EvalRecord], title: str = "") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 11), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=14)
    axes = fig.subplots(3, 2).ravel()
    for ax, panel in zip(axes, PANELS):
        _draw(ax, panel, metrics, records)
    axes[-1].set_axis_off()
    fig.savefig(path, format="png", dpi=90)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _table(columns: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Counts(Record):
    error = CorruptManifest
    documents: int | None = None
    tokens: int | None = None


class _SplitCounts(_Counts):
    sources: dict[str, _Counts] = Field(default_factory=dict)


class _SourceCounts(Record):
    error = CorruptManifest
    name: str = ""
    path: str = ""
    records: int | None = None
    kept: int | None = None
    quarantined: int | None = None

    @property
    def dropped(self) -> int:
        if self.quarantined is not None:
            return self.quarantined
        return (self.records or 0) - (self.kept or 0)


class _QuarantineCounts(Record):
    error = CorruptManifest
    records: int = 0
    by_reason: dict[str, int] = Field(default_factory=dict)


class _TokenizerSummary(Record):
    error = CorruptManifest
    type: str = "?"
    vocab_size: int | None = None


class ManifestSummary(Record):
    """What the report shows of a dataset's manifest.json: the parts of `Manifest` it prints, each
    optional, so that the page still renders (and says what it has) for a dataset written by an
    older version or by hand; the hashes that training and eval verify are not looked at here."""

    error = CorruptManifest
    splits: dict[str, _SplitCounts] = Field(default_factory=dict)
    sources: list[_SourceCounts] = Field(default_factory=list)
    quarantine: _QuarantineCounts = Field(default_factory=_QuarantineCounts)
    tokenizer: _TokenizerSummary = Field(default_factory=_TokenizerSummary)


def read_manifest_summary(data_dir: str | Path) -> ManifestSummary | None:
    """The summary of ``data_dir``'s manifest, None when there is none (not prepared yet)."""
    store = open_storage(data_dir)
    if not store.exists(DatasetDir.MANIFEST):
        return None
    return ManifestSummary.from_json(store.read_bytes(DatasetDir.MANIFEST), str(store.path(DatasetDir.MANIFEST)))


def _manifest_section(manifest: ManifestSummary | None, where: Path | None) -> str:
    if manifest is None:
        return f"<p>No manifest found{f' at {html.escape(str(where))}' if where else ''}.</p>"
    splits = manifest.splits
    parts = [_table(["split", "documents", "tokens"],
                    [[s, info.documents, info.tokens] for s, info in splits.items()])]
    rows = [[s, name, src.documents, src.tokens] for s, info in splits.items() for name, src in info.sources.items()]
    if rows:
        parts.append(_table(["split", "source", "documents", "tokens"], rows))
    if manifest.sources:
        parts.append(_table(["source", "path", "records", "kept", "quarantined"],
                            [[s.name, s.path, s.records, s.kept, s.dropped] for s in manifest.sources]))
    q, tok = manifest.quarantine, manifest.tokenizer
    reasons = ", ".join(f"{html.escape(str(k))}: {v}" for k, v in q.by_reason.items()) or "none"
    parts.append(f"<p>Quarantined records: <b>{_fmt(q.records)}</b> (by reason: {reasons}). "
                 f"Tokenizer: {html.escape(tok.type)}, vocabulary {_fmt(tok.vocab_size)}. "
                 f"Manifest: {html.escape(str(where))}</p>")
    return "\n".join(parts)


def _eval_section(records: list[EvalRecord]) -> str:
    """One column per evaluated checkpoint, one row per metric (there are more metrics than checkpoints)."""
    if not records:
        return "<p>No checkpoint evaluated yet (<code>pretrain eval RUN_DIR</code>).</p>"
    keys = sorted({k for r in records for k in r.metrics})
    rows = [["tokens trained", *(r.tokens_trained for r in records)]]
    rows += [[k.removeprefix("eval/"), *(r.metrics.get(k) for r in records)] for k in keys]
    return _table(["step", *(f"{r.step:,}" for r in records)], rows, "wide")


def _key_numbers(status: dict, metrics: list[dict], records: list[EvalRecord]) -> list[tuple[str, str]]:
    items = [("step", f"{_fmt(status.get('step'))} of {_fmt(status.get('max_steps'))}"),
             ("tokens trained", f"{_fmt(status.get('tokens_done'))} of {_fmt(status.get('tokens_budget'))} "
                                f"({status.get('progress', 0) * 100:.1f}%)")]
    for key, label in (("train/loss", "final train loss"), ("val/loss", "final validation loss (training)"),
                       ("train/tokens_per_s", "recent tokens/s")):
        steps, values = series(metrics, key)
        if steps:
            shown = f"{values[-1]:,.0f}" if key.endswith("_per_s") else _fmt(values[-1])  # a rate: no decimals
            items.append((label, f"{shown} at step {steps[-1]:,}"))
    if records:
        last = records[-1]
        items.append(("newest eval", f"step {last.step:,}: validation loss {_fmt(last.loss)}, "
                                     f"perplexity {_fmt(last.perplexity)}"))
        for name, m in last.tasks.items():
            items.append((f"task {name}", ", ".join(f"{k} {_fmt(v)}" for k, v in m.items())))
    return items


def _wall_time(metrics: list[dict]) -> str:
    times = [r["time"] for r in metrics if isinstance(r.get("time"), (int, float))]
    if len(times) < 2:
        return "unknown"
    from pipeline.units import format_duration

    return f"{format_duration(max(times) - min(times))} between the first and the last logged step"


def _params(model, vocab: int | None) -> str:
    from pipeline.models.flops import param_count
    from pipeline.train.compat import resolve_model_config

    if model.vocab_size is None and vocab is None:
        return "? (vocabulary unknown: the dataset is not prepared)"
    try:
        resolved = resolve_model_config(model, vocab) if vocab else model
        return f"{param_count(resolved) / 1e6:,.2f}M (vocabulary {resolved.padded_vocab_size:,})"
    except ValueError:
        return "?"


def run_card(cfg, metrics: list[dict], status: dict, vocab: int | None = None) -> list[tuple[str, str]]:
    """What was trained, on what, how: model, parameters, tokens, data blend, hyperparameters,
    wall time, hardware (from the resolved config, the training log and the tokenizer's ``vocab``)."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    resolved = next((r for r in metrics if r.get("world_size")), {})
    params = _params(m, vocab)
    blend = ", ".join(f"{s.resolved_name} (weight {s.weight:g})" for s in cfg.data.sources) or "see the data section"
    world = resolved.get("world_size", "?")
    try:
        accum = cfg.gradient_accumulation_steps(world) if isinstance(world, int) else "?"
    except ValueError:
        accum = "?"
    peak = max((r["train/peak_memory_gib"] for r in metrics if isinstance(r.get("train/peak_memory_gib"), float)),
               default=None)
    return [
        ("model", f"{m.arch}, {m.n_layer} layers × d_model {m.d_model}, {m.n_head} heads, "
                  f"max sequence {m.max_seq_len:,}; parameters {params}"),
        ("tokens", f"{_fmt(status.get('tokens_done'))} trained of a budget of {_fmt(status.get('tokens_budget'))} "
                   f"({t.max_steps:,} steps × {t.global_batch_size:,} sequences × {t.seq_len:,} tokens)"),
        ("data blend", blend),
        ("optimizer", f"AdamW lr {o.lr:g}, betas {tuple(o.betas)}, weight decay {o.weight_decay:g}, "
                      f"warmup {o.warmup_steps:,} steps, {o.schedule} schedule"),
        ("batch", f"global {t.global_batch_size:,} = micro {t.micro_batch_size_per_gpu} × accumulation {accum} × "
                  f"world size {world}; ZeRO-{t.zero_stage}, {t.precision}"),
        ("wall time", _wall_time(metrics)),
        ("hardware", f"world size {world}" + (f", peak memory {peak:.2f} GiB per rank" if peak is not None else "")),
    ]


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1300px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}table.wide{display:block;overflow-x:auto}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px}.plot svg{width:100%;height:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{font-weight:600}dd{margin:0}"""


def render_html(run_dir: Path, png_name: str) -> str:
    cfg = run_config(run_dir)
    if cfg is None:
        raise EvalError(f"{run_dir}: not a run directory (no {RunDir.CONFIG} and no committed checkpoint)")
    metrics = read_jsonl(RunDir(run_dir).metrics)
    records = load_records(run_dir)
    status = run_status(run_dir)
    manifest_path = DatasetDir(cfg.data.output_dir).manifest
    manifest = read_manifest_summary(cfg.data.output_dir)
    svgs = panel_svgs(metrics, records)
    numbers = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                      for k, v in _key_numbers(status, metrics, records))
    plots = "".join(f'<div class="plot" id="plot-{p}">{svgs[p]}</div>' for p in PANELS)
    card = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in run_card(cfg, metrics, status, manifest.tokenizer.vocab_size if manifest else None))
    wandb = (f"project <b>{html.escape(cfg.tracking.project)}</b>, group "
             f"<b>{html.escape(cfg.tracking.group or cfg.name)}</b>, training run "
             f"<code>{html.escape(str(status.get('wandb_run_id')))}</code>, eval runs "
             f"<code>{html.escape(', '.join(status['eval_wandb_run_ids']) or 'none')}</code>")
    title = f"Run report: {cfg.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(cfg.model.arch.upper())} · {html.escape(str(run_dir))} · generated
{time.strftime('%Y-%m-%d %H:%M:%S')} · W&amp;B: {wandb} · plots also in {html.escape(png_name)}</p>
<h2>Run card</h2><dl id="run-card">{card}</dl>
<h2>Key numbers</h2><dl id="key-numbers">{numbers}</dl>
<h2>Curves</h2><div class="plots">{plots}</div>
<h2>Evaluation per checkpoint</h2><div id="eval-table">{_eval_section(records)}</div>
<h2>Data</h2><div id="data">{_manifest_section(manifest, manifest_path)}</div>
</body></html>
"""


def write_report(run_dir: str | Path, out: str | Path | None = None, log=print) -> Path:
    """Write the HTML report (default RUN_DIR/report.html) and the PNG beside it; returns the HTML path.
    ``run_dir`` may also be one of the run's checkpoint directories."""
    from pipeline.eval.where import run_dir_of

    run_dir = run_dir_of(run_dir, "report")
    html_path = Path(out) if out else RunDir(run_dir).report_html
    png_path = html_path.with_suffix(".png")
    page = render_html(run_dir, png_path.name)
    png = io.BytesIO()
    cfg = run_config(run_dir)
    write_png(png, read_jsonl(RunDir(run_dir).metrics), load_records(run_dir),
              title=f"{cfg.name} — {run_dir}" if cfg is not None else str(run_dir))
    store = open_storage(html_path.parent)
    store.write_atomic(png_path.name, png.getvalue())
    store.write_atomic(html_path.name, page)
    log(f"report: {html_path} (open it in any browser; nothing is fetched) and {png_path}")
    return html_path
