"""Bundled presets by name, and a commented starting config (`pretrain presets`, `pretrain init`).

A preset is a YAML file under the bundled ``configs/`` folder; its name is the file name without
``.yaml`` (``gpt2-tiny`` is ``configs/models/gpt2-tiny.yaml``). ``base: [gpt2-tiny]`` in any config,
wherever it lives, names it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import PRESETS_DIR, ModelConfig, find_preset, preset_files

DEFAULT_VOCAB = 50257  # for sizes of presets that leave the vocabulary to the tokenizer


def _model_of(path: Path) -> ModelConfig | None:
    from pipeline.config import load_config

    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "model" not in raw and not raw.get("base"):
        return None
    model = load_config(path).model
    return model.model_copy(update={"vocab_size": model.vocab_size or DEFAULT_VOCAB})


def describe_presets() -> list[tuple[str, str, str]]:
    """(name, what it is, parameters) for `pretrain presets`."""
    from pipeline.models.flops import param_count

    rows = []
    for name, path in preset_files().items():
        model = _model_of(path)
        first = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        size = f"{param_count(model) / 1e6:,.1f}M" if model is not None else "-"
        rows.append((name, first if len(first) <= 72 else first[:71].rsplit(" ", 1)[0] + " …", size))
    return rows


def format_presets() -> str:
    rows = describe_presets()
    width = max(len(r[0]) for r in rows)
    lines = [f"{'preset':<{width}}  {'parameters':>10}  description"]
    lines += [f"{n:<{width}}  {s:>10}  {d}" for n, d, s in rows]
    lines.append(f"(use as `base: [NAME]` in any config; sizes with vocabulary {DEFAULT_VOCAB:,} where the "
                 f"preset leaves it to the tokenizer; files under {PRESETS_DIR})")
    return "\n".join(lines)


def starting_config(model: str = "gpt2-small", data: list[str] | tuple[str, ...] = ()) -> str:
    """A commented config to start from: ``pretrain init > my.yaml``."""
    find_preset(model, "--model")
    preset = _model_of(preset_files()[model])
    bert = preset is not None and preset.arch == "bert"
    seq_len = min(128 if bert else 1024, preset.max_seq_len if preset is not None else 1024)
    sources = "\n".join(f"    - {{path: {p}, text_field: text, weight: 1}}" for p in data) or \
        "    - {path: corpora/my-corpus.jsonl, text_field: text, weight: 1}   # jsonl, parquet, txt or a saved HF dataset"
    return f"""# A starting config made by `pretrain init --model {model}`. Every field is documented in
# pipeline/config.py; `pretrain plan THIS_FILE` checks it and estimates memory and time.
base: [{model}]
run_name: my-run
run_dir: runs/my-run              # checkpoints, metrics, eval records, W&B offline runs
data:
  output_dir: data/my-data        # shards + manifest.json (pretrain prepare THIS_FILE)
  sources:
{sources}
  tokenizer:
    type: {"wordpiece" if bert else "bpe"}
    vocab_size: {30522 if bert else 50257}
train:
  seq_len: {seq_len}
  micro_batch_size_per_gpu: 8       # per rank; global = micro × accumulation × world size
  global_batch_size: 256
  max_steps: 10000
  zero_stage: 2
  precision: bf16                   # fp32 on CPU
optim:
  lr: 3.0e-4
  warmup_steps: 500
checkpoint:
  save_interval_steps: 1000
  keep_last: 3
"""
