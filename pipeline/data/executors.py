"""Who runs `pretrain prepare`'s stage functions (workers.py) over the blocks of the corpus.

- ``local``: no Ray. The driver reads each file in turn and cuts it into blocks (``data.block_bytes``
  of text); ``data.num_cpus`` processes forked from the driver apply the stage function to them
  (one process: the driver itself). At most two blocks per process are in flight, so memory does
  not grow with the corpus. Dedup's bucket counting runs in the driver with its rows spilled to disk
  (``dedup.find_duplicates_local``). Starting costs a fork, so small corpora finish in about the
  time their work takes.
- ``ray``: Ray Data. One read task per file, the stage functions in ``map_batches`` on every CPU of
  the embedded Ray instance or of the cluster joined with ``--ray-address`` / ``RAY_ADDRESS``, and
  dedup's bucket counting as a ``groupby``. Starting Ray (its GCS, raylet and worker processes)
  costs seconds, which pays off only on large corpora or across machines.

Both implement `Executor`, the Protocol prepare.py is written against, and hand the driver each
block's result in corpus order, computed by the same functions, so every output file is
byte-identical whichever executor ran (``tests/e2e/test_prepare_executors.py``).
``choose_executor`` decides what ``data.executor: auto`` means for a run.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import DataConfig
from pipeline.data import workers
from pipeline.data.dedup import Duplicate, find_duplicates, find_duplicates_local
from pipeline.data.fast_tokenizer import Encoder
from pipeline.data.sources import Corpus, input_bytes  # noqa: F401 (input_bytes: what `auto` weighs)


class Executor(Protocol):
    """What `pretrain prepare` asks of whoever runs its stage functions (workers.py) over the corpus.

    Every method hands back results in corpus order, so the driver writes the same bytes whichever
    executor ran."""

    name: str  # "local" or "ray", as the manifest records it
    flat_results: bool  # whether a stage's result may hold a column of its own length (the token stream)

    def describe(self) -> str:
        """The resources it runs on, for the log (``2 processes``, ``16 Ray CPUs``)."""

    def share(self, value: Any) -> Any:
        """``value`` as the stage functions receive it (a Ray object ref, or the value itself)."""

    def tokenizer_arg(self, tokenizer_json: str, kind: str) -> Any:
        """The tokenizer as `workers.encode_batch` receives it (an Encoder, or a ref to its JSON)."""

    def map(self, corpus: Corpus, fn: Callable, **kwargs) -> Iterator[dict]:
        """``fn(block, **kwargs)`` for every block of records of ``corpus``, in corpus order."""

    def duplicates(self, corpus: Corpus, spill_dir: Path) -> tuple[list[Duplicate], int, np.ndarray]:
        """(duplicates, records scanned, filter verdicts) of the dedup pass; ``spill_dir`` is local
        scratch the caller creates and removes."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def choose_executor(executor: str, *, ray_address: str | None, env_address: str | None, input_bytes: int,
                    local_max_bytes: int, ray_running: bool = False) -> tuple[str, str]:
    """("local" or "ray", why) for ``data.executor``; ``ray_address`` is --ray-address, ``env_address``
    RAY_ADDRESS, ``ray_running`` whether this process has initialized Ray already."""
    if executor == "ray":
        return "ray", "data.executor is ray"
    if executor == "local":
        ignored = " (the Ray address is ignored)" if ray_address or env_address else ""
        return "local", f"data.executor is local{ignored}"
    if ray_address:
        return "ray", f"--ray-address {ray_address} is given"
    if env_address:
        return "ray", f"RAY_ADDRESS={env_address} is set"
    if ray_running:
        return "ray", "Ray is already running in this process"
    if input_bytes > local_max_bytes:
        return "ray", (f"the input is {_mib(input_bytes)} on disk, over data.local_max_bytes "
                       f"({_mib(local_max_bytes)})")
    return "local", (f"the input is {_mib(input_bytes)} on disk, at most data.local_max_bytes "
                     f"({_mib(local_max_bytes)}), and no Ray address is given")


def ray_running() -> bool:
    """Whether this process has initialized Ray (without importing it when it has not)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Embedded Ray by default; `address` (or RAY_ADDRESS) joins an existing cluster."""
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # "local": a new instance even if `ray start` left a cluster on this machine (plain
        # ray.init() would join that one, and then refuse num_cpus)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)


def _filtered(parts: list[np.ndarray]) -> np.ndarray:
    """The dedup pass's filter verdicts, sorted by doc id."""
    rows = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    return rows[np.argsort(rows[:, 0], kind="stable")]


# ---- local ------------------------------------------------------------------------------------------

_TASK: Callable[[dict], dict] | None = None  # what a forked worker applies to each block


def _run_task(block: dict) -> dict:
    return _TASK(block)


def _on_columns(fn: Callable, kwargs: dict, block: dict) -> dict:
    """``fn`` on a block of the local executor: a raw jsonl block is parsed first, in the worker."""
    return fn(workers.as_columns(block), **kwargs)


def _in_order(task: Callable[[dict], dict], blocks: Iterator[dict], processes: int) -> Iterator[dict]:
    """task(block) for every block, in order, in ``processes`` forked processes.

    The workers are forked when the first block is submitted, after ``_TASK`` is set: they inherit
    the task and everything it refers to (the tokenizer's encoder, the duplicate ids) from the
    driver's memory, so only blocks and results travel through pipes."""
    global _TASK
    _TASK = task
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
    pending: deque = deque()
    try:
        for block in blocks:
            pending.append(pool.submit(_run_task, block))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _TASK = None


class LocalExecutor:
    """The stage functions in processes forked from the driver (or in the driver, for one CPU)."""

    name = "local"
    flat_results = True  # results travel through a pipe: two buffers beat an object per record

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.processes = max(1, cfg.num_cpus or os.cpu_count() or 1)

    def describe(self) -> str:
        return f"{self.processes} process{'es' if self.processes > 1 else ''}"

    def share(self, value):
        return value

    def tokenizer_arg(self, tokenizer_json: str, kind: str):
        return Encoder(tokenizer_json, kind)  # built once here; forked workers inherit it

    def blocks(self, corpus: Corpus) -> Iterator[dict]:
        for f in corpus.files:
            src = self.cfg.sources[f.source]
            yield from workers.local_blocks(f, src.text_field, src.text_unit, self.cfg.block_bytes)

    def map(self, corpus: Corpus, fn: Callable, **kwargs) -> Iterator[dict]:
        task = functools.partial(_on_columns, fn, kwargs)
        if self.processes == 1:
            return map(task, self.blocks(corpus))
        return _in_order(task, self.blocks(corpus), self.processes)

    def duplicates(self, corpus: Corpus, spill_dir: Path) -> tuple[list[Duplicate], int, np.ndarray]:
        """(duplicates, records scanned, filter verdicts) of the dedup pass."""
        cfg, records, filtered = self.cfg, [0], []

        def tapped(batches):
            for b in batches:
                records[0] += len(b["doc_id"])
                filtered.append(workers.filtered_rows(b["doc_id"], b["reason"]))
                yield b

        meta = self.map(corpus, workers.scan_batch, clean=cfg.clean.model_dump(), dedup=cfg.dedup.model_dump())
        duplicates = find_duplicates_local(tapped(meta), cfg.dedup, spill_dir)
        return duplicates, records[0], _filtered(filtered)


# ---- Ray ---------------------------------------------------------------------------------------------

class RayExecutor:
    """Ray Data on the Ray instance this process has initialized (``init_ray``)."""

    name = "ray"
    flat_results = False  # Ray Data batches are tables: every column one row per record

    def __init__(self, cfg: DataConfig):
        import ray

        self.cfg = cfg
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.target_max_block_size = cfg.block_bytes
        ctx.enable_progress_bars = False  # Progress logs instead
        # Reserving CPUs per operator would keep some from the encoder while the (light) reader idles;
        # backpressure on object-store memory still bounds what is in flight.
        ctx.op_resource_reservation_enabled = False
        # dedup's groupby: the task-based sort shuffle starts no aggregator actors (seconds each), which
        # makes it several times faster here; Ray suggests its push-based variant beyond ~1 TB
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    def describe(self) -> str:
        import ray

        return f"{int(ray.cluster_resources().get('CPU', 0))} Ray CPUs"

    def share(self, value):
        import ray

        return ray.put(value)

    def tokenizer_arg(self, tokenizer_json: str, kind: str):
        return self.share(tokenizer_json)  # each worker builds its Encoder once (workers._encoder)

    def records(self, corpus: Corpus):
        """Ray Dataset of every raw record: doc_id, text, reason, raw."""
        import ray

        # At most one read task per file. A concurrency of its own also keeps Ray Data from fusing
        # reading with the next operator, which would then process a whole file in one task.
        return ray.data.from_items(corpus.items(), override_num_blocks=len(corpus.files)).map_batches(
            workers.read_batches, batch_size=1, fn_kwargs={"block_bytes": self.cfg.block_bytes},
            compute=ray.data.TaskPoolStrategy(size=len(corpus.files)),
        )

    def _mapped(self, corpus: Corpus, fn: Callable, **kwargs):
        return self.records(corpus).map_batches(fn, batch_format="numpy", batch_size=None, fn_kwargs=kwargs)

    def map(self, corpus: Corpus, fn: Callable, **kwargs) -> Iterator[dict]:
        return self._mapped(corpus, fn, **kwargs).iter_batches(batch_size=None, batch_format="numpy")

    def duplicates(self, corpus: Corpus, spill_dir: Path) -> tuple[list[Duplicate], int, np.ndarray]:
        import ray

        cfg = self.cfg
        meta = self._mapped(corpus, workers.scan_batch, clean=cfg.clean.model_dump(),
                            dedup=cfg.dedup.model_dump()).materialize()  # small rows (no text), read thrice
        cpus = int(ray.cluster_resources().get("CPU", 1))
        duplicates = find_duplicates(meta, cfg.dedup, num_partitions=max(1, min(64, cpus)))
        filtered = [workers.filtered_rows(b["doc_id"], b["reason"]) for b in
                    meta.select_columns(["doc_id", "reason"]).iter_batches(batch_size=None, batch_format="numpy")]
        return duplicates, meta.count(), _filtered(filtered)
