"""Preprocessing throughput: our `pretrain prepare` against the usual ways, on the same cores.

    python benchmarks/preprocess.py CORPUS.jsonl[.gz] [--workers 2] [--rounds 3] [--repeat 1]
        [--methods megatron,hf-datasets,pool-tiktoken,limit,local,ray]

- **ours**: `prepare()` end to end — read → clean (NFC) → tokenize → pack → write shards + quarantine +
  manifest with sha256 (dedup off, the tokenizer given so none is trained). Every round runs it in a
  fresh Python process and times the call to `prepare()` until it returns, so whatever it starts is
  counted: forking the local executor's processes, or `ray.init` and Ray's worker processes. Rows:
  *local* (`data.executor: local`), *ray, cold* (`executor: ray`, the first call, `ray.init`
  included) and *ray, warm* (a second call in the same process, Ray's workers running). The process's
  start and its import of `pipeline.data.prepare` (the baselines' imports happen in this process
  beforehand, uncounted too) are printed apart, not counted. Every round writes into the same output
  directory, so from the second round on the fast-encoder check is the cached verdict of
  ``.stages/encoder.json`` (the first round pays for it).
- **multiprocessing.Pool + tiktoken**: what a user writes by hand with the same encoder: a
  ``Pool(N)`` whose workers ``json.loads`` a line, encode it with tiktoken's ``encode_ordinary`` (the
  same ranks and pre-tokenization as ours) and return it as uint16 bytes, ``imap(chunksize=32)`` in
  order, the parent writing a ``.bin`` and an MMIDIDX ``.idx``.
- **limit**: tiktoken's ``encode_ordinary`` alone over the corpus's texts, already in memory, on N
  forked processes: no reading, parsing, normalization, conversion or writing. What this encoder can
  do on these cores, the ceiling for every row.
- **HF datasets**: `load_dataset("json")` + `map(batched=True, num_proc=N)` with the same tokenizer as
  a `transformers` PreTrainedTokenizerFast, end of document appended (Arrow cache in a fresh dir).
- **Megatron-style**: `tools/preprocess_data.py`'s design: a `multiprocessing.Pool(N)` whose workers
  `json.loads` a line and encode it (HF `tokenizers`, one document per call), `imap(chunksize=32)`,
  the parent writing a uint16 `.bin` and an MMIDIDX `.idx`.

All use one BPE tokenizer trained on CORPUS beforehand (not timed) and must produce the same number
of tokens (ours: a few fewer, as NFC changes some documents). Each round runs the methods in the
order given, so a baseline and ours alternate. tokens/s = tokens written (documents + one
end-of-document each) / wall seconds of the step; the table gives the median over the rounds. On a
shared machine wall time depends on what else runs, so the CPU seconds every process of a method
used (pool workers, or Ray's GCS, raylet and workers plus the driver) are printed per million tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


# ---- Megatron-style pool ------------------------------------------------------------------------

class _MegatronEncoder:
    def __init__(self, tokenizer_path: str, eod: int):
        self.tokenizer_path, self.eod = tokenizer_path, eod

    def initializer(self) -> None:
        from tokenizers import Tokenizer

        _MegatronEncoder.tokenizer = Tokenizer.from_file(self.tokenizer_path)

    def encode(self, line: str) -> list[int]:
        text = json.loads(line)["text"]
        ids = _MegatronEncoder.tokenizer.encode(text, add_special_tokens=False).ids
        ids.append(self.eod)
        return ids


def megatron_style(corpus: Path, tokenizer_path: str, eod: int, workers: int, out: Path) -> int:
    from pipeline.data.shards import write_index

    encoder = _MegatronEncoder(tokenizer_path, eod)
    lengths, tokens = [], 0
    with mp.get_context("fork").Pool(workers, initializer=encoder.initializer) as pool, \
            _open_text(corpus) as fin, open(out / "megatron.bin", "wb") as fbin:
        for ids in pool.imap(encoder.encode, fin, 32):
            fbin.write(np.array(ids, dtype=np.uint16).tobytes(order="C"))
            lengths.append(len(ids))
            tokens += len(ids)
    write_index(out / "megatron.idx", np.array(lengths, dtype=np.int32), np.dtype(np.uint16))
    return tokens


# ---- multiprocessing.Pool + tiktoken (what a user writes by hand) --------------------------------

class _TiktokenEncoder:
    """Pool worker state: a tiktoken Encoding with the same ranks and pre-tokenization as the BPE
    (built the way fast_tokenizer.py builds ours: the vocabulary's bytes → ranks, GPT-2's pattern)."""

    def __init__(self, tokenizer_path: str, eod: int):
        self.tokenizer_path, self.eod = tokenizer_path, eod

    def initializer(self) -> None:
        from tokenizers import Tokenizer

        from pipeline.data.fast_tokenizer import tiktoken_encoding

        _TiktokenEncoder.enc = tiktoken_encoding(Tokenizer.from_file(self.tokenizer_path))

    def encode(self, line: bytes) -> bytes:
        ids = _TiktokenEncoder.enc.encode_ordinary(json.loads(line)["text"])
        ids.append(self.eod)
        return np.array(ids, dtype=np.uint16).tobytes()  # uint16 in the worker: 2 bytes a token back


def tiktoken_pool(corpus: Path, tokenizer_path: str, eod: int, workers: int, out: Path) -> int:
    """``multiprocessing.Pool(N)``: the parent reads lines, workers json.loads + tiktoken's
    encode_ordinary + uint16, ``imap(chunksize=32)`` in order, the parent writes .bin/.idx."""
    from pipeline.data.shards import write_index

    encoder = _TiktokenEncoder(tokenizer_path, eod)
    lengths, tokens = [], 0
    opener = gzip.open if corpus.suffix == ".gz" else open
    with mp.get_context("fork").Pool(workers, initializer=encoder.initializer) as pool, \
            opener(corpus, "rb") as fin, open(out / "pool-tiktoken.bin", "wb") as fbin:
        for data in pool.imap(encoder.encode, fin, 32):
            fbin.write(data)
            lengths.append(len(data) // 2)
            tokens += len(data) // 2
    write_index(out / "pool-tiktoken.idx", np.array(lengths, dtype=np.int32), np.dtype(np.uint16))
    return tokens


# ---- the encoder's limit ---------------------------------------------------------------------------

_LIMIT: dict = {}  # texts and encoding, set before the fork and in each worker's initializer


def _limit_init(tokenizer_path: str) -> None:
    from tokenizers import Tokenizer

    from pipeline.data.fast_tokenizer import tiktoken_encoding

    _LIMIT["enc"] = tiktoken_encoding(Tokenizer.from_file(tokenizer_path))


def _limit_part(k: int, n: int) -> tuple[int, float]:
    c0, enc = time.process_time(), _LIMIT["enc"]
    tokens = sum(len(enc.encode_ordinary(t)) for t in _LIMIT["texts"][k::n])
    return tokens, time.process_time() - c0


def limit(texts: list[str], tokenizer_path: str, workers: int) -> tuple[float, float, int]:
    """tiktoken's encode_ordinary alone over ``texts`` (in memory, inherited by fork) on ``workers``
    processes, no I/O, nothing else: (wall s, CPU s, tokens + one end-of-document id per text, as
    the other rows count). The Encoding is built in every process before the clock starts."""
    _LIMIT["texts"] = texts
    with mp.get_context("fork").Pool(workers, initializer=_limit_init, initargs=(tokenizer_path,)) as pool:
        pool.starmap(time.sleep, [(0.05,)] * workers)  # every worker started and initialized
        t0 = time.perf_counter()
        parts = pool.starmap(_limit_part, [(k, workers) for k in range(workers)])
        wall = time.perf_counter() - t0
    _LIMIT.clear()
    return wall, sum(c for _, c in parts), sum(n for n, _ in parts) + len(texts)


# ---- HF datasets ---------------------------------------------------------------------------------

def hf_datasets(corpus: Path, tokenizer_path: str, eod: int, workers: int, out: Path) -> int:
    import datasets
    import pyarrow.compute as pc
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path)

    def encode(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eod] for x in ids]}

    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(out / "hf-cache"))
    done = ds.map(encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    return int(pc.sum(pc.list_value_length(done.data.column("input_ids"))).as_py())


# ---- ours ------------------------------------------------------------------------------------------

_OURS = """
import json, os, resource, sys, time
t0 = time.perf_counter()
sys.path[:0] = [{root!r}, {bench!r}]
from pipeline.config import DataConfig
from pipeline.data.prepare import prepare
from preprocess import _own_cpu_seconds, _ray_cpu_seconds
imported = time.perf_counter() - t0
rows = []
for executor in {executors!r}:
    cfg = DataConfig(sources=[{{"path": {corpus!r}}}], output_dir={out!r}, num_cpus={workers},
                     tokenizer={{"path": {tokenizer!r}}}, executor=executor)
    ray_before = _ray_cpu_seconds() if rows and executor == "ray" else 0.0
    cpu0, t = _own_cpu_seconds() + ray_before, time.perf_counter()
    m = prepare(cfg, log=lambda *_: None, force=True)
    wall = time.perf_counter() - t
    cpu = _own_cpu_seconds() + (_ray_cpu_seconds() if executor == "ray" else 0.0) - cpu0
    rows.append({{"tokens": sum(m["splits"][s]["tokens"] for s in m["splits"]), "wall": wall, "cpu": cpu,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "executor": m["executor"]["name"], "encoder": m["tokenizer"]["encoder"],
                  "ray_start": m["throughput"]["stage_seconds"].get("ray_start")}})
print("RESULT " + json.dumps({{"imported": imported, "rows": rows}}))
"""


def ours(corpus: Path, tokenizer_path: str, workers: int, out: Path, executors: tuple[str, ...]) -> dict:
    """prepare() in a fresh Python process, once per entry of ``executors`` (same process)."""
    code = _OURS.format(root=str(ROOT), bench=str(Path(__file__).resolve().parent), executors=list(executors),
                        corpus=str(corpus), out=str(out / "ours"), workers=workers, tokenizer=tokenizer_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    total = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"our prepare failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(line[len("RESULT "):]), "process": total}


def _cpu() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (the pools' workers, the local
    executor's processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _ray_cpu_seconds() -> float:
    """CPU time of this Ray instance's processes (GCS, raylet, workers) so far."""
    import psutil
    import ray

    procs = {}
    for infos in ray._private.worker._global_node.all_processes.values():
        for info in infos:
            p = psutil.Process(info.process.pid)
            procs.update({q.pid: q for q in [p, *p.children(recursive=True)]})
    total = 0.0
    for q in procs.values():
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _measured(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its exited children, result)."""
    cpu0 = _own_cpu_seconds()
    t0 = time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - t0
    return wall, _own_cpu_seconds() - cpu0, result


METHODS = ("megatron", "hf-datasets", "pool-tiktoken", "limit", "local", "ray")


def _corpus_copy(corpus: Path, repeat: int, tmp: Path) -> Path:
    if repeat == 1:
        return corpus
    out = tmp / ("corpus.jsonl" + (".gz" if corpus.suffix == ".gz" else ""))
    with open(out, "wb") as f:
        for _ in range(repeat):
            f.write(corpus.read_bytes())
    return out


def _round(methods: list[str], corpus: Path, texts: list[str], tok_path: str, eod: int, workers: int, tmp: Path,
           rows: dict) -> str:
    """One measurement of every method; a line of what is not counted."""
    def add(name, n, wall, cpu, rss=None):
        rows.setdefault(name, []).append((n, wall, cpu, rss))

    baselines = {"megatron": ("Megatron-style Pool + HF tokenizers → uint16 .bin", megatron_style),
                 "hf-datasets": ("HF datasets.map(num_proc)", hf_datasets),
                 "pool-tiktoken": ("multiprocessing.Pool + tiktoken → uint16 .bin", tiktoken_pool)}
    note = []
    for m in methods:
        if m in baselines:
            shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
            wall, cpu, n = _measured(baselines[m][1], corpus, tok_path, eod, workers, tmp)
            add(baselines[m][0], n, wall, cpu)
        elif m == "limit":
            wall, cpu, n = limit(texts, tok_path, workers)
            add("limit: tiktoken encode_ordinary alone, all cores, texts in memory, no I/O", n, wall, cpu)
        elif m == "local":
            r = ours(corpus, tok_path, workers, tmp, ("local",))
            row = r["rows"][0]
            add("ours, local executor (cold, fresh process)", row["tokens"], row["wall"], row["cpu"], row["rss_mb"])
            note.append(f"import {r['imported']:.2f}s, local child process {r['process']:.2f}s, encoder "
                        f"{row['encoder']}")
        elif m == "ray":
            r = ours(corpus, tok_path, workers, tmp, ("ray", "ray"))
            cold, warm = r["rows"]
            add("ours, ray executor, cold (fresh process, ray.init included)", cold["tokens"], cold["wall"],
                cold["cpu"], cold["rss_mb"])
            add("ours, ray executor, warm (2nd call, Ray workers running)", warm["tokens"], warm["wall"], warm["cpu"])
            note.append(f"ray.init {cold['ray_start']:.2f}s")
    return "; ".join(note)


def _table(rows: dict) -> list[str]:
    def rate(name):
        runs = rows.get(name)
        return float(np.median([n / w for n, w, _, _ in runs])) if runs else None

    pool = rate("multiprocessing.Pool + tiktoken → uint16 .bin")
    lim = next((rate(k) for k in rows if k.startswith("limit")), None)
    out = ["| method | tokens | wall s per round | tokens/s (median) | × Pool+tiktoken | % of limit | "
           "CPU-s per M tokens | driver peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in rows.items():
        r = rate(name)
        cpu = float(np.median([c / n * 1e6 for n, _, c, _ in runs]))
        walls = " / ".join(f"{w:.2f}" for _, w, _, _ in runs)
        rss = [x for *_, x in runs if x is not None]
        out.append(f"| {name} | {runs[0][0]:,} | {walls} | {r:,.0f} | {f'{r / pool:.2f}' if pool else '–'} | "
                   f"{f'{r / lim:.0%}' if lim else '–'} | {cpu:.2f} | {f'{max(rss):.0f}' if rss else ''} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="jsonl or jsonl.gz with a 'text' field")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes / Ray CPUs for every method")
    ap.add_argument("--rounds", type=int, default=3, help="repeat every measurement this many times")
    ap.add_argument("--repeat", type=int, default=1, help="concatenate the corpus this many times first")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, run in this order in every round (of {', '.join(METHODS)})")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")

    from importlib.metadata import version

    from pipeline.config import TokenizerConfig
    from pipeline.data.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    try:
        corpus = _corpus_copy(args.corpus, args.repeat, tmp)
        with _open_text(args.corpus) as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        tok = train_tokenizer(texts, TokenizerConfig(vocab_size=args.vocab_size))
        tok_path = str(tmp / "tokenizer.json")
        tok.save(tok_path)
        eod = tok.token_to_id("<|endoftext|>")
        texts = texts * args.repeat if "limit" in methods else []
        mb = corpus.stat().st_size / 1e6
        print(f"corpus {args.corpus} ×{args.repeat} ({mb:.1f} MB on disk); BPE vocabulary {args.vocab_size} trained "
              f"on it; {args.workers} workers on {_cpu()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"python {platform.python_version()}, " + ", ".join(
            f"{pkg} {version(pkg)}" for pkg in ("ray", "tokenizers", "tiktoken", "datasets", "transformers")))
        rows: dict[str, list] = {}  # (tokens, wall s, CPU s, driver peak RSS MB or None) per round
        for r in range(args.rounds):
            load = os.getloadavg()[0]
            note = _round(methods, corpus, texts, tok_path, eod, args.workers, tmp, rows)
            print(f"round {r + 1}: 1-min load average before {load:.2f}; not counted: {note}", flush=True)
        print("\n" + "\n".join(_table(rows)))
        counts = sorted({runs[0][0] for runs in rows.values()})
        if len(counts) > 1:
            print(f"\ntoken counts differ: {counts} (ours normalizes to NFC first: data.clean.normalization)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
