"""A run directory on an object store (``run_dir: s3://…``): what is pulled and pushed, and when.

Every process works on its node's mirror of the run (`pipeline.mirror`); the store is the truth.

Pull (`pull_run`, at the start of `train`, `eval`, `status`, `report`, `export`): the run's small
files (config, logs, eval records) and the committed checkpoints asked for. A checkpoint is
committed when ``checkpoints/step_N/COMMIT`` exists on the store; its files are fetched, each
sha256-checked against COMMIT, and the local COMMIT is written last. Local checkpoints the store
does not hold committed are deleted from the mirror (the store retired them, or they never
committed). Files already in the mirror with the right hash are kept, so a restart on the same
node downloads nothing.

Push at a save (`upload_node_files`, `commit_remote`): after every rank wrote its files into the
local staging tree, one process per node uploads that node's files to their final keys and
reports ``{name: [size, sha256]}``; rank 0 gathers every node's listing and uploads COMMIT (every
object with size and sha256) last, then the ``latest`` hint, then applies retention on the store
(COMMIT first, then the rest). A crash at any moment leaves no COMMIT that lists a missing or
partial object: the objects are all up before COMMIT is sent. The run's small files follow at each
commit and at exit (`push_run`).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.mirror import (SyncState, fetch, local_files, local_sha256, node_lock, node_local_rank, pull_files,
                             push_files)
from pipeline.objstore import ObjectInfo, ObjectStorage
from pipeline.rundir import RunDir, step_of, tag_for
from pipeline.storage import LocalStorage
from pipeline.train.records import CheckpointError, Commit

CKPT = RunDir.CHECKPOINTS
#: keys of the run that the store never gets from here: checkpoints have their own protocol, the
#: lease is an object of its own, Ray Train writes its own folder, the universal conversion is scratch
NOT_PUSHED = (CKPT, RunDir.LOCK, RunDir.LOCK_GUARD, "ray_train", f"{RunDir.EVAL_DIR}/{RunDir.LOCK}")


def _is_small_file(key: str) -> bool:
    return not any(key == p or key.startswith(p + "/") for p in NOT_PUSHED) and not key.startswith(".")


def _commits(infos: dict[str, ObjectInfo]) -> dict[int, str]:
    """Committed steps on the store → their tag."""
    found = {}
    for key in infos:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == CKPT and parts[2] == RunDir.COMMIT and step_of(parts[1]) is not None:
            found[step_of(parts[1])] = parts[1]
    return dict(sorted(found.items()))


def committed_steps(run: RunDir) -> list[int]:
    """The steps committed on the store (for `eval --watch` and status)."""
    return list(_commits(run.remote_storage.infos(CKPT + "/")))


# ---------------------------------------------------------------------------------------- pull


def pull_run(run: RunDir, checkpoints: str | list[int] = "newest", log: Callable[[str], None] = print) -> None:
    """Bring this node's mirror of ``run`` up to date: small files, and the committed checkpoints
    ``checkpoints`` names: "newest", "all", "unevaluated" (no eval.json on the store yet), a list of
    steps, "none", or "meta" (of every committed one only COMMIT, trainer_state.json, config.yaml
    and eval.json: enough for status and reports, not for a load). No-op for a local run."""
    if not run.remote:
        return
    store = run.remote_storage
    with node_lock(run.root):
        state = SyncState(run.root)
        infos = store.infos()
        pull_files(store, state, {k: i for k, i in infos.items() if _is_small_file(k)})
        commits = _commits(infos)
        _drop_uncommitted(run, state, commits)
        fetched = 0
        if checkpoints == "meta":
            for step in commits:
                _pull_meta(run, store, state, infos, step)
        else:
            for step in _wanted(checkpoints, commits, infos):
                fetched += _pull_checkpoint(run, store, state, infos, step)
        if commits:
            LocalStorage(run.checkpoints).write_atomic(RunDir.LATEST, commits[max(commits)] + "\n")
        state.save()
    if fetched:
        log(f"storage: fetched {fetched / 1e6:,.1f} MB of checkpoints from {run.remote}")


def _wanted(which: str | list[int], commits: dict[int, str], infos: dict[str, ObjectInfo]) -> list[int]:
    if which == "all":
        return list(commits)
    if which == "none":
        return []
    if which == "newest":
        return list(commits)[-1:]
    if which == "unevaluated":
        return [s for s, tag in commits.items() if f"{CKPT}/{tag}/{RunDir.EVAL_JSON}" not in infos]
    return [s for s in which if s in commits]


META = (RunDir.COMMIT, "trainer_state.json", RunDir.CONFIG, RunDir.EVAL_JSON)


def _pull_meta(run: RunDir, store: ObjectStorage, state: SyncState, infos: dict[str, ObjectInfo], step: int) -> None:
    """A committed checkpoint's small records only (its COMMIT last)."""
    base = f"{CKPT}/{tag_for(step)}"
    first = {k: i for k, i in infos.items() if k.startswith(base + "/") and k.rsplit("/", 1)[-1] in META[1:]}
    pull_files(store, state, first)
    pull_files(store, state, {k: i for k, i in infos.items() if k == f"{base}/{RunDir.COMMIT}"})


def _drop_uncommitted(run: RunDir, state: SyncState, commits: dict[int, str]) -> None:
    """Mirror checkpoints the store does not hold committed go (retired, or never finished); a
    save in flight on this node (its staging tree) is left alone."""
    local = run.checkpoint_storage
    for name in local.children():
        if step_of(name) is not None and name not in commits.values():
            local.delete_tree(name)
            state.forget(f"{CKPT}/{name}")


def _pull_checkpoint(run: RunDir, store: ObjectStorage, state: SyncState, infos: dict[str, ObjectInfo],
                     step: int) -> int:
    """One committed checkpoint into the mirror, verified; bytes fetched."""
    tag = tag_for(step)
    base = f"{CKPT}/{tag}"
    raw = store.read_bytes(f"{base}/{RunDir.COMMIT}")
    record = Commit.from_json(raw, store.path(f"{base}/{RunDir.COMMIT}"))
    local = run.checkpoint_storage
    for name in record.files:
        if not local.child(tag).inside(name) or ".." in name.split("/"):
            raise CheckpointError(f"{store.path(base)}/{RunDir.COMMIT}: entry {name!r} points outside the checkpoint")
    local.delete(f"{tag}/{RunDir.COMMIT}")  # first: a pull cut short leaves an uncommitted mirror copy
    missing = [n for n in record.files if f"{base}/{n}" not in infos]
    if missing:
        raise CheckpointError(f"{store.path(base)}/{missing[0]}: listed in {RunDir.COMMIT} but missing on the store")
    todo = [(f"{base}/{name}", sha, record.sizes.get(name, infos[f"{base}/{name}"].size))
            for name, sha in record.files.items() if local_sha256(state, f"{base}/{name}") != sha]
    fetched = fetch(store, state, todo)
    listed = set(record.files) | {RunDir.COMMIT, RunDir.EVAL_JSON}
    for name in local.child(tag).list():
        if name not in listed:
            local.delete(f"{tag}/{name}")
    evaluated = {k: i for k, i in infos.items() if k == f"{base}/{RunDir.EVAL_JSON}"}
    pull_files(store, state, evaluated)
    local.write_atomic(f"{tag}/{RunDir.COMMIT}", raw, fsync=True)
    state.record(f"{base}/{RunDir.COMMIT}", etag=infos.get(f"{base}/{RunDir.COMMIT}", ObjectInfo("", 0, "")).etag)
    return fetched


# ---------------------------------------------------------------------------------------- push


def clear_step(run: RunDir, step: int) -> None:
    """Rank 0 before a save: objects an earlier attempt at this step left on the store (it never
    committed: COMMIT is sent last) go, so COMMIT will list exactly what is there."""
    if run.remote:
        run.remote_storage.delete_tree(f"{CKPT}/{tag_for(step)}")


def upload_node_files(run: RunDir, staged: str, step: int, workers: int = 16) -> dict[str, list]:
    """One process per node (local rank 0): every file this node wrote into the staging tree
    ``staged`` (a key under checkpoints/) goes to its final key; ``{name: [size, sha256]}``."""
    if not run.remote or node_local_rank() != 0:
        return {}
    local = run.checkpoint_storage.child(staged)
    names = [n for n in local.list() if not n.endswith(".tmp")]
    listing = {n: [local.size(n), local.sha256(n)] for n in names}
    base = f"{CKPT}/{tag_for(step)}"
    run.remote_storage.upload_many([(local.path(n), f"{base}/{n}") for n in names], workers=workers)
    return listing


def commit_remote(run: RunDir, step: int, listings: list[dict[str, list]], keep_last: int,
                  keep_every_steps: int | None, hold: int | None) -> None:
    """Rank 0, once every node's files are up: COMMIT last, then ``latest``, then retention and the
    run's small files."""
    merged: dict[str, list] = {}
    for listing in listings:
        merged.update(listing or {})
    if not merged:
        raise CheckpointError(f"{run.where(CKPT)}: no files were uploaded for step {step}; nothing to commit")
    store = run.remote_storage
    tag = tag_for(step)
    record = Commit(step=step, files={n: v[1] for n, v in merged.items()}, sizes={n: v[0] for n, v in merged.items()})
    store.write_atomic(f"{CKPT}/{tag}/{RunDir.COMMIT}", record.to_json())
    store.write_atomic(f"{CKPT}/{RunDir.LATEST}", tag + "\n")
    remote_retention(run, keep_last, keep_every_steps, hold)
    push_run(run)


def remote_retention(run: RunDir, keep_last: int, keep_every_steps: int | None, hold: int | None) -> list[int]:
    """The store's checkpoints as `checkpoint.apply_retention` keeps the mirror's: the ones not kept
    lose COMMIT first, then their objects; uncommitted debris older than the newest commit goes."""
    from pipeline.train.checkpoint import retained_steps

    store = run.remote_storage
    infos = store.infos(CKPT + "/")
    commits = _commits(infos)
    keep = retained_steps(list(commits), keep_last, keep_every_steps)
    if hold:
        waiting = [s for s in commits if s not in keep and f"{CKPT}/{commits[s]}/{RunDir.EVAL_JSON}" not in infos]
        keep |= set(waiting[:hold])
    removed = []
    for step, tag in commits.items():
        if step not in keep:
            store.delete(f"{CKPT}/{tag}/{RunDir.COMMIT}")
            store.delete_many(k for k in infos if k.startswith(f"{CKPT}/{tag}/") and not k.endswith(RunDir.COMMIT))
            removed.append(step)
    newest = max(commits, default=-1)
    debris = {k.split("/")[1] for k in infos if k.count("/") >= 2 and (step_of(k.split("/")[1]) or -1) < newest
              and step_of(k.split("/")[1]) is not None and step_of(k.split("/")[1]) not in commits}
    for tag in debris:
        store.delete_many(k for k in infos if k.startswith(f"{CKPT}/{tag}/"))
    return removed


def push_run(run: RunDir) -> list[str]:
    """The run's small files that changed (logs, records, configs, the report, W&B's offline
    folders, eval records inside checkpoints) up to the store: at each commit and at exit."""
    if not run.remote:
        return []
    with node_lock(run.root):
        state = SyncState(run.root)
        small = [k for k in local_files(run.root) if _is_small_file(k)]
        evals = [f"{CKPT}/{k}" for k in local_files(run.checkpoints)
                 if k.endswith("/" + RunDir.EVAL_JSON) and step_of(k.split("/")[0]) is not None]
        sent = push_files(run.remote_storage, state, small + evals)
        state.save()
    return sent


def localize(location: str, checkpoints: str | list[int] = "newest", log: Callable[[str], None] = print) -> str:
    """For the commands that take a run or checkpoint directory (eval, status, report, export,
    consolidate): a URI becomes this node's up-to-date mirror of it (``checkpoints`` as in
    `pull_run`; a checkpoint URI fetches that checkpoint); a local path is returned as it is."""
    from pipeline.objstore import is_uri

    if not is_uri(location):
        return location
    head, _, tail = str(location).rstrip("/").rpartition("/")
    step = step_of(tail)
    if step is not None and head.endswith("/" + CKPT):
        run = RunDir(head[: -len(CKPT) - 1])
        pull_run(run, [step], log=log)
        if not run.checkpoint_storage.exists(f"{tail}/{RunDir.COMMIT}"):
            raise CheckpointError(f"{location}: not a committed checkpoint on the store (no {RunDir.COMMIT})")
        return str(run.checkpoint(step))
    run = RunDir(location)
    run.remote_storage.check()
    pull_run(run, checkpoints, log=log)
    return str(run.root)


def share_universal(run: RunDir, tag: str, rank: int) -> None:
    """All ranks, before loading a universal conversion of ``tag`` that rank 0 just made in its
    node's mirror: on an object store, rank 0 uploads it and every other node fetches it (one
    process per node), since no node sees another's files. No-op for a local run."""
    import torch.distributed as dist

    if not run.remote:
        return
    base = f"{CKPT}/{RunDir.UNIVERSAL}/{tag}"
    store = run.remote_storage
    if rank == 0:
        store.delete_tree(base)
        local = LocalStorage(run.universal_dir / tag)
        store.upload_many([(local.path(k), f"{base}/{k}") for k in local.list()])
    dist.barrier()
    with node_lock(run.root):
        if not (run.universal_dir / tag).is_dir():
            state = SyncState(run.root)
            fetch(store, state, [(k, None, i.size) for k, i in store.infos(base + "/").items()])
    dist.barrier()


def drop_universal(run: RunDir, rank: int) -> None:
    """After the load: each node's copy of the conversion goes, and rank 0 removes the store's."""
    if rank == 0 or (run.remote and node_local_rank() == 0):  # a shared directory: rank 0 alone
        run.checkpoint_storage.delete_tree(RunDir.UNIVERSAL)
    if rank == 0 and run.remote:
        run.remote_storage.delete_tree(f"{CKPT}/{RunDir.UNIVERSAL}")
