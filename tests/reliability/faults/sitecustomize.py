"""Fault injection for tests/reliability: imported at interpreter start when this folder is on
PYTHONPATH, and active only in rank 0 of a run with ``PRETRAIN_FAULT=<point>:<step>``.

At the point, rank 0 writes ``PRETRAIN_FAULT_MARKER`` and stops itself (SIGSTOP); the harness then
SIGKILLs the job, so the crash lands exactly there. Points, all inside the commit of step N
(``pipeline.train.checkpoint.commit``, through ``pipeline.storage``):

- before_commit:    ``.tmp-step_N`` renamed to ``step_N``, COMMIT not yet written
- commit_unrenamed: ``step_N/COMMIT.tmp`` written and fsynced, not yet renamed to COMMIT
- before_latest:    COMMIT written, ``latest`` not yet pointing at step_N
- in_retention:     deleting the oldest committed checkpoint; half of its data files are gone

One point signals instead of freezing, to preempt a run at a known step:

- signal_after_commit: once step_N is committed, send ``PRETRAIN_FAULT_SIGNAL`` (default SIGTERM)
  to ``PRETRAIN_FAULT_TARGET``: ``launcher`` (the `pretrain train` process that started torchrun,
  as a scheduler would) or ``self`` (rank 0 alone); the marker holds the time it was sent.
"""

import os

_SPEC = os.environ.get("PRETRAIN_FAULT")


def _install(point: str, step: int, marker: str) -> None:
    import signal
    import shutil
    import time
    from pathlib import Path

    from pipeline import storage
    from pipeline.train import checkpoint as ckpt

    tag = ckpt.tag_for(step)
    real_publish, real_rmtree, real_fsync_write, real_commit = storage._publish_file, shutil.rmtree, \
        ckpt._fsync_write, ckpt.commit
    committing = []

    def freeze():
        Path(marker).write_text(f"{point}:{step}\n")
        os.kill(os.getpid(), signal.SIGSTOP)
        while True:  # continued by mistake: never get past the fault point
            time.sleep(1)

    def fsync_write(store, key, text):
        path = Path(store.path(key))
        if point == "before_commit" and path.name == ckpt.COMMIT and path.parent.name == tag:
            freeze()
        if point == "before_latest" and path.name == ckpt.LATEST and text.strip() == tag:
            freeze()
        return real_fsync_write(store, key, text)

    def publish_file(src, dst):
        dst = Path(dst)
        if point == "commit_unrenamed" and dst.name == ckpt.COMMIT and dst.parent.name == tag:
            freeze()
        return real_publish(src, dst)

    class ShutilProxy:
        def __getattr__(self, name):
            return getattr(shutil, name)

        def rmtree(self, path, *args, **kwargs):
            path = Path(path)
            if point == "in_retention" and committing == [step] and path.name.startswith("step_") and path.name != tag:
                # the adversarial order for a crash mid-delete: data files first, COMMIT (if any) last
                files = sorted(p for p in path.iterdir() if p.name != ckpt.COMMIT)
                for p in files[: max(1, len(files) // 2)]:
                    p.unlink()
                freeze()
            return real_rmtree(path, *args, **kwargs)

    def commit(root, tmp_dir, step_, *args, **kwargs):
        committing[:] = [step_]
        out = real_commit(root, tmp_dir, step_, *args, **kwargs)
        if point == "signal_after_commit" and step_ == step:
            signum = getattr(signal, os.environ.get("PRETRAIN_FAULT_SIGNAL", "SIGTERM"))
            target = os.getpid()
            if os.environ.get("PRETRAIN_FAULT_TARGET", "launcher") == "launcher":  # rank → torchrun → CLI
                torchrun = os.getppid()
                target = int(Path(f"/proc/{torchrun}/stat").read_text().rsplit(")", 1)[1].split()[1])
            Path(marker).write_text(f"{time.time()}\n")
            os.kill(target, signum)
        return out

    ckpt._fsync_write, ckpt.commit = fsync_write, commit
    storage._publish_file, storage.shutil = publish_file, ShutilProxy()


if _SPEC and os.environ.get("RANK") == "0":
    _point, _, _step = _SPEC.partition(":")
    try:
        _install(_point, int(_step), os.environ["PRETRAIN_FAULT_MARKER"])
    except Exception as exc:  # the checkpoint module changed shape: make the harness say so
        with open(os.environ.get("PRETRAIN_FAULT_MARKER", "fault-error"), "w") as f:
            f.write(f"hook-error: {exc!r}\n")
        raise
