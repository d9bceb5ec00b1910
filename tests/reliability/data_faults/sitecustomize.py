"""Fault injection for the data tests of tests/reliability: imported at interpreter start when this
folder is on PYTHONPATH, active only with ``PRETRAIN_DATA_FAULT=<kind>:<where>[:<n>]``.

- ``pause:<pass>:<n>``: the driver of `pretrain prepare` stops (sleeping, so a signal still lands)
  after handing out ``n`` blocks of a pass of the local executor: ``dedup``, ``tokenizer`` or
  ``shards``; ``pause:manifest`` stops it right before the manifest is written. It first writes
  ``PRETRAIN_DATA_FAULT_MARKER``, so the test knows where the signal (or SIGKILL) it sends lands.
- ``fill:<file name>``: right before the named file (``manifest.json``, ``tokenizer.json``,
  ``quarantine.jsonl``, ``duplicates.jsonl``, ``dedup.json``, …) is written atomically, the
  filesystem holding it is filled up by ``PRETRAIN_DATA_FAULT_FILL`` (a filler file), so the write
  meets a real ENOSPC; ``fill:<pass>:<n>``: the same after ``n`` blocks of a pass.
"""

import os

_SPEC = os.environ.get("PRETRAIN_DATA_FAULT")
_PASSES = {"scan_batch": "dedup", "kept_texts": "tokenizer", "encode_batch": "shards"}


def _pause():
    import time
    from pathlib import Path

    Path(os.environ["PRETRAIN_DATA_FAULT_MARKER"]).write_text(_SPEC + "\n")
    deadline = time.time() + 120
    while time.time() < deadline:  # a signal handler raises out of the sleep
        time.sleep(0.02)


def _fill():
    """Fill the filesystem of the filler file to the last byte (a real ENOSPC for the next write)."""
    path = os.environ["PRETRAIN_DATA_FAULT_FILL"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


def _act():
    _pause() if _SPEC.startswith("pause:") else _fill()


def _install(kind: str, where: str, n: int) -> None:
    from pathlib import Path

    from pipeline.data import executors, prepare
    from pipeline.storage import LocalStorage

    real_map, real_open_atomic, real_write_manifest = executors.LocalExecutor.map, LocalStorage.open_atomic, \
        prepare.write_manifest

    def map_(self, corpus, fn, **kwargs):
        batches = real_map(self, corpus, fn, **kwargs)
        if _PASSES.get(getattr(fn, "__name__", "")) != where:
            return batches

        def tapped():
            for i, b in enumerate(batches):
                if i == n:
                    _act()
                yield b
        return tapped()

    def open_atomic(self, key, fsync=False):
        if kind == "fill" and Path(key).name == where:
            _act()
        return real_open_atomic(self, key, fsync)

    def write_manifest(*args, **kwargs):
        if where == "manifest" and kind == "pause":
            _act()
        return real_write_manifest(*args, **kwargs)

    executors.LocalExecutor.map = map_
    LocalStorage.open_atomic = open_atomic
    prepare.write_manifest = write_manifest


if _SPEC:
    _kind, _, _rest = _SPEC.partition(":")
    _where, _, _n = _rest.partition(":")
    _install(_kind, _where, int(_n or 0))
