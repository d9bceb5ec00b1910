"""Where `pretrain prepare`'s time goes: CPU seconds per part of the shards pass, driver and workers.

    python benchmarks/prepare_profile.py CORPUS.jsonl[.gz] [--repeat 16] [--workers 2]

Two runs of `prepare()` (local executor, dedup off, the tokenizer given, a BPE trained on the corpus
beforehand), each in a fresh Python process under cProfile:

- **one process** (``data.num_cpus: 1``): the driver does every part itself, so the profile holds
  all the work; each part's CPU seconds are what it costs on one core.
- **N processes** (``--workers``): the profile of the driver alone (what it does while the forked
  workers clean and encode), with the workers' CPU seconds (``os.times`` of the exited children)
  and the wall time.

A part is the cumulative time of the functions that do it (``PARTS``); they do not nest in one
another, so the parts and "everything else" add up to the total. cProfile adds a cost per Python
call, which inflates the parts made of many small calls (record building) more than the C calls
(decompression, JSON, encoding).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

# part → (file suffix, function name) whose cumulative times make it; the first match wins
PARTS = {
    "imports (pipeline.data.prepare)": [],  # CPU seconds, measured apart, before the profile starts
    "gunzip (zlib inflate + crc32)": [("~", "<method 'decompress' of 'zlib.Decompress' objects>"),
                                      ("~", "<built-in method zlib.crc32>")],
    "JSON parse": [("json/__init__.py", "loads")],
    "NFC check / normalize": [("~", "<built-in method unicodedata.is_normalized>"),
                              ("~", "<built-in method unicodedata.normalize>")],
    "encode (tiktoken)": [("tiktoken/core.py", "encode_ordinary"), ("tiktoken/core.py", "encode_to_numpy"),
                          ("tiktoken/core.py", "encode_ordinary_batch")],
    "token ids → uint16 arrays": [("fast_tokenizer.py", "ids_array"), ("~", "<built-in method numpy.fromiter>")],
    "fast-encoder check": [("prepare.py", "_sample_texts"), ("fast_tokenizer.py", "choose_encoder"),
                           ("fast_tokenizer.py", "verified_encoder")],
    "tokenizer / encoder build": [("fast_tokenizer.py", "__init__"), ("tokenizers", "from_str")],
    "shard writing": [("shards.py", "add_document"), ("shards.py", "add_documents"), ("shards.py", "close")],
    "sha256 (inputs, outputs, stages)": [("shards.py", "sha256_file"), ("storage.py", "sha256"),
                                         ("manifest.py", "write_manifest")],
    "transfer (pickle, pipes)": [("concurrent/futures/_base.py", "result"),
                                          ("concurrent/futures/process.py", "submit")],
}


def _part_of(key: tuple[str, int, str]) -> str | None:
    file, _, name = key
    for part, funcs in PARTS.items():
        if any(file.endswith(f) and name == n for f, n in funcs):
            return part
    return None


def buckets(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds per part; a function inside a part already counted is not counted again."""
    raw = stats.stats  # key → (calls, primitive calls, tottime, cumtime, callers)
    parts = {p: 0.0 for p in PARTS}
    for key, (_, _, _, cum, callers) in raw.items():
        part = _part_of(key)
        if part is None:
            continue
        # only the calls from outside any part (a part calling another part's function: the outer counts)
        outer = sum(v[3] for caller, v in callers.items() if _part_of(caller) is None and not _inside(caller, raw))
        parts[part] += outer if callers else cum
    return parts


def _inside(key, raw, seen=None) -> bool:
    """Whether ``key`` is only ever called from inside some part (so its callees are counted there)."""
    seen = seen or set()
    if key in seen:
        return False
    seen.add(key)
    callers = raw.get(key, (0, 0, 0, 0, {}))[4]
    if not callers:
        return False
    return all(_part_of(c) is not None or _inside(c, raw, seen) for c in callers)


_CHILD = """
import cProfile, json, os, pstats, sys, time
sys.path[:0] = {path!r}
t0 = time.process_time()
from pipeline.config import DataConfig
from pipeline.data.prepare import prepare
imported = time.process_time() - t0
cfg = DataConfig(sources=[{{"path": {corpus!r}}}], output_dir={out!r}, num_cpus={workers},
                 tokenizer={{"path": {tokenizer!r}}}, executor="local")
t = os.times()
prof = cProfile.Profile(time.process_time)  # CPU seconds: the machine may be shared
t1 = time.perf_counter()
prof.enable()
m = prepare(cfg, log=lambda *_: None, force=True)
prof.disable()
wall = time.perf_counter() - t1
u = os.times()
prof.dump_stats({stats!r})
print("RESULT " + json.dumps({{"imported": imported, "wall": wall, "driver_cpu": u.user + u.system - t.user - t.system,
      "workers_cpu": u.children_user + u.children_system - t.children_user - t.children_system,
      "tokens": sum(m["splits"][s]["tokens"] for s in m["splits"])}}))
"""


def profile_run(corpus: Path, tokenizer: str, workers: int, tmp: Path) -> tuple[dict, dict[str, float]]:
    stats = tmp / f"prof-{workers}.out"
    code = _CHILD.format(path=sys.path[:2], corpus=str(corpus), out=str(tmp / "out"), workers=workers,
                         tokenizer=tokenizer, stats=str(stats))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"profiled prepare failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    parts = buckets(pstats.Stats(str(stats)))
    parts["imports (pipeline.data.prepare)"] = result["imported"]
    return result, parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--repeat", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()

    from preprocess import _corpus_copy, _open_text

    from pipeline.config import TokenizerConfig
    from pipeline.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="prepare-profile-") as d:
        tmp = Path(d)
        corpus = _corpus_copy(args.corpus, args.repeat, tmp)
        with _open_text(args.corpus) as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        tokenizer = str(tmp / "tokenizer.json")
        train_tokenizer(texts, TokenizerConfig(vocab_size=args.vocab_size)).save(tokenizer)
        print(f"corpus {args.corpus} ×{args.repeat}, {os.cpu_count()} cores, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
        one, one_parts = profile_run(corpus, tokenizer, 1, tmp)
        many, many_parts = profile_run(corpus, tokenizer, args.workers, tmp)
    print(f"\n| part | one process: CPU s | share | {args.workers} processes: driver CPU s |")
    print("|---|---:|---:|---:|")
    total1 = one["driver_cpu"] + one["imported"]
    for part in PARTS:
        print(f"| {part} | {one_parts[part]:.2f} | {one_parts[part] / total1:.0%} | {many_parts[part]:.2f} |")
    rest1 = one["driver_cpu"] - sum(v for k, v in one_parts.items() if not k.startswith("imports"))
    rest2 = many["driver_cpu"] - sum(v for k, v in many_parts.items() if not k.startswith("imports"))
    print(f"| everything else (records, cleaning, bookkeeping, profiler) | {rest1:.2f} | {rest1 / total1:.0%} | "
          f"{rest2:.2f} |")
    print(f"| **total**: wall s (under the profiler) | {one['wall']:.2f} | | {many['wall']:.2f} |")
    print(f"| CPU s: driver / workers | {one['driver_cpu']:.2f} / – | | {many['driver_cpu']:.2f} / "
          f"{many['workers_cpu']:.2f} |")
    print(f"\ntokens {one['tokens']:,}; CPU seconds (cProfile on time.process_time); the "
          f"{args.workers}-process column is the driver's own CPU in each part")
    return 0


if __name__ == "__main__":
    sys.exit(main())
