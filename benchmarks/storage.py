"""Object storage on loopback: staging a prepared dataset into a node's cache, and saving a
checkpoint to the store, each beside its baseline, in one run.

The script starts its own S3 API server on 127.0.0.1 (moto's server, in a process of its own: an
*emulator* of the S3 API written in Python, not a real store), writes a synthetic dataset to the
bucket (shards of random bytes, a tokenizer file and a manifest listing every file's sha256, as
`pretrain prepare` leaves one), and times:

- **staging** (what `pretrain train` does on every node): `pipeline.data.staging.stage_dataset` into a
  fresh cache (parallel downloads, ranged for large files, each file sha256-verified, the manifest
  last), against a loop of boto3 ``download_file`` calls, single-stream
  (``TransferConfig(use_threads=False)``) and with boto3's default transfer threads; the boto3 rows
  verify nothing.
- **checkpoint save** of a gpt2-small-sized state (124 M parameters: fp32 weights ~0.5 GB, Adam's
  fp32 master copy and two moments ~1.5 GB, as a 2-rank ZeRO checkpoint: one model file and two
  optimizer shards): ``torch.save`` to local disk (fsync'd), against the same files uploaded with
  `ObjectStorage.upload_many` (the checkpoint path writes each rank's files locally first, then
  uploads them: both columns are given).

Loopback numbers measure the client side and the emulator, not a real store: on a real store the
network and the store's per-request latency dominate, which is what parallel transfers are for.

    python benchmarks/storage.py                 # 200 MB dataset, full gpt2-small checkpoint
    python benchmarks/storage.py --ckpt-scale 0.25 --dataset-mb 100 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "bench"
GPT2_SMALL_PARAMS = 124_439_808


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """moto's S3 API emulator as a process of its own on loopback; the environment pointing at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    os.environ.update(env)
    try:
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("moto server did not start")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client():
    import boto3

    return boto3.client("s3")


def _random_file(path: Path, size: int, seed: int) -> str:
    """``size`` pseudo-random bytes (incompressible, like token ids); their sha256."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    rng, h = np.random.default_rng(seed), hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.integers(0, 256, min(left, 16 << 20), dtype=np.uint8).tobytes()
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def write_dataset(scratch: Path, total_mb: int, prefix: str) -> tuple[int, list[str]]:
    """A synthetic prepared dataset on the bucket: 2 sources × 2 train shards and 1 validation shard
    each (.bin, .idx), a tokenizer, a manifest. Its bytes and keys."""
    from pipeline.data.manifest import Manifest

    local = scratch / "dataset"
    bins = [(s, split, i) for s in ("web", "code") for split, i in (("train", 0), ("train", 1), ("validation", 0))]
    bin_size = total_mb * 10**6 // len(bins)
    files: dict[str, str] = {}
    for n, (src, split, i) in enumerate(bins):
        stem = f"{split}/{src}-{i:05d}"
        files[f"{stem}.bin"] = _random_file(local / f"{stem}.bin", bin_size, n)
        files[f"{stem}.idx"] = _random_file(local / f"{stem}.idx", bin_size // 500, 100 + n)
    files["tokenizer.json"] = _random_file(local / "tokenizer.json", 1 << 20, 999)
    splits = {split: {"sources": {src: {"shards": [f"{split}/{src}-{i:05d}" for s, sp, i in bins
                                                   if s == src and sp == split]} for src in ("web", "code")}}
              for split in ("train", "validation")}
    manifest = Manifest.from_dict({"tokenizer": {"file": "tokenizer.json"}, "splits": splits, "files": files})
    (local / "manifest.json").write_text(manifest.to_json(indent=2))
    c = _client()
    keys = sorted(files) + ["manifest.json"]
    for key in keys:
        c.upload_file(str(local / key), BUCKET, f"{prefix}/{key}")
    shutil.rmtree(local)
    return sum(_size(c, f"{prefix}/{k}") for k in keys), keys


def _size(c, key: str) -> int:
    return c.head_object(Bucket=BUCKET, Key=key)["ContentLength"]


def _warm_up() -> None:
    """Imports and the first client of each kind outside the timings (boto3's was made writing the
    dataset): a one-off per process, about a second for s3fs/aiobotocore."""
    import pipeline.data.staging  # noqa: F401
    from pipeline.objstore import ObjectStorage

    ObjectStorage(f"s3://{BUCKET}").check()


def time_staging(scratch: Path, prefix: str, workers: int) -> float:
    from pipeline.data.staging import stage_dataset
    from pipeline.rundir import DatasetDir

    cache = scratch / "cache-ours"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["PRETRAIN_CACHE_DIR"] = str(cache)
    t0 = time.perf_counter()
    stage_dataset(DatasetDir(f"s3://{BUCKET}/{prefix}"), workers=workers, log=lambda _: None)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache)
    return seconds


def time_boto3(scratch: Path, prefix: str, keys: list[str], threads: bool, verify: bool = False) -> float:
    """A loop of boto3 ``download_file`` calls; ``verify``: then the sha256 of each file, as ours does."""
    from boto3.s3.transfer import TransferConfig
    from pipeline.data.shards import sha256_file

    dest = scratch / "cache-boto3"
    shutil.rmtree(dest, ignore_errors=True)
    c = _client()
    config = TransferConfig() if threads else TransferConfig(use_threads=False)
    t0 = time.perf_counter()
    for key in keys:
        path = dest / key
        path.parent.mkdir(parents=True, exist_ok=True)
        c.download_file(BUCKET, f"{prefix}/{key}", str(path), Config=config)
        if verify:
            sha256_file(path)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest)
    return seconds


def checkpoint_state(scale: float) -> dict[str, dict]:
    """A 2-rank ZeRO-style checkpoint of a gpt2-small-sized model (× ``scale``): the fp32 weights in
    one file, Adam's fp32 master weights and two moments split over two optimizer shards."""
    import torch

    n = int(GPT2_SMALL_PARAMS * scale)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(n, generator=gen)
    half = n // 2
    state = {"mp_rank_00_model_states.pt": {"module": weights}}
    for rank, (a, b) in enumerate(((0, half), (half, n))):
        part = weights[a:b]
        state[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = {
            "fp32_master": part.clone(), "exp_avg": torch.randn(b - a, generator=gen),
            "exp_avg_sq": torch.rand(b - a, generator=gen)}
    return state


def save_local(state: dict[str, dict], dest: Path) -> float:
    import torch

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    for name, obj in state.items():
        with open(dest / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def upload(src: Path, prefix: str, workers: int) -> float:
    from pipeline.objstore import ObjectStorage

    store = ObjectStorage(f"s3://{BUCKET}/{prefix}")
    items = [(p, p.name) for p in sorted(src.iterdir())]
    t0 = time.perf_counter()
    store.upload_many(items, workers=workers)
    seconds = time.perf_counter() - t0
    store.delete_many(store.list())  # free the emulator's memory
    return seconds


def upload_boto3(src: Path, prefix: str) -> float:
    """The baseline: a loop of boto3 ``upload_file`` calls (default TransferConfig: threaded multipart)."""
    c = _client()
    t0 = time.perf_counter()
    for p in sorted(src.iterdir()):
        c.upload_file(str(p), BUCKET, f"{prefix}/{p.name}")
    seconds = time.perf_counter() - t0
    for p in sorted(src.iterdir()):
        c.delete_object(Bucket=BUCKET, Key=f"{prefix}/{p.name}")
    return seconds


def _fmt(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-mb", type=int, default=200)
    p.add_argument("--ckpt-scale", type=float, default=1.0, help="fraction of the gpt2-small state to save")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=16, help="parallel transfers (storage.workers)")
    p.add_argument("--scratch", default=None, help="local scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-storage-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    with moto_server() as endpoint:
        _client().create_bucket(Bucket=BUCKET)
        total, keys = write_dataset(scratch, args.dataset_mb, "datasets/synthetic")
        print(f"dataset: {len(keys)} objects, {total / 1e6:,.1f} MB on {endpoint}", flush=True)
        _warm_up()
        runs = {"ours": [], "single": [], "threads": [], "verified": []}
        for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits every method alike
            runs["ours"].append(time_staging(scratch, "datasets/synthetic", args.workers))
            runs["single"].append(time_boto3(scratch, "datasets/synthetic", keys, threads=False))
            runs["threads"].append(time_boto3(scratch, "datasets/synthetic", keys, threads=True))
            runs["verified"].append(time_boto3(scratch, "datasets/synthetic", keys, threads=False, verify=True))
        for name, label in (("single", "boto3 download_file loop, single stream (use_threads=False)"),
                            ("verified", "boto3 single-stream loop + sha256 of each file (what ours verifies)"),
                            ("threads", "boto3 download_file loop, default TransferConfig (threads)"),
                            ("ours", f"ours: stage_dataset ({args.workers} workers, ranged, sha256-verified)")):
            med = statistics.median(runs[name])
            rows.append(("staging", label, total, runs[name], total / med / 1e6))
        print(json.dumps({"staging": runs}), flush=True)
        del runs

        state = checkpoint_state(args.ckpt_scale)
        ckpt = scratch / "ckpt"
        local, up, base = [], [], []
        for r in range(args.rounds):
            local.append(save_local(state, ckpt))
            up.append(upload(ckpt, f"runs/bench/checkpoints/step_{r:08d}", args.workers))
            base.append(upload_boto3(ckpt, f"runs/bench/boto3/step_{r:08d}"))
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        shutil.rmtree(ckpt)
        rows.append(("checkpoint", "torch.save to local disk (fsync)", size, local, size / statistics.median(local) / 1e6))
        rows.append(("checkpoint", "boto3 upload_file loop (default TransferConfig), after the local save", size,
                     base, size / statistics.median(base) / 1e6))
        rows.append(("checkpoint", f"ours: upload_many to S3 ({args.workers} workers), after the local save", size, up,
                     size / statistics.median(up) / 1e6))
        both = [a + b for a, b in zip(local, up)]
        rows.append(("checkpoint", "local save + upload (what a save to s3:// costs)", size, both,
                     size / statistics.median(both) / 1e6))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\ncheckpoint scale {args.ckpt_scale:g} of gpt2-small ({int(GPT2_SMALL_PARAMS * args.ckpt_scale):,} "
          f"parameters); moto on loopback (an S3 emulator, not a real store)\n")
    print("| what | method | MB | seconds per round | MB/s (median) |")
    print("|---|---|---:|---:|---:|")
    for what, label, nbytes, secs, rate in rows:
        print(f"| {what} | {label} | {nbytes / 1e6:,.0f} | {_fmt(secs)} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
