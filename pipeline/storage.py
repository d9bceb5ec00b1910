"""The one storage interface: every file of a run or dataset directory is read and written here.

A `Storage` is rooted at a directory (or, later, an object-store prefix) and speaks in *keys*:
slash-separated paths relative to that root (``checkpoints/step_00000010/COMMIT``). It offers only
what an object store can do too:

- ``read_bytes`` / ``read_text`` / ``open_read``: whole objects or a stream;
- ``write_atomic`` / ``open_atomic``: an object appears whole or not at all (local: a temporary file
  in the same folder, fsynced on request, then ``os.replace``; an object store's PUT is atomic);
- ``list(prefix)``: every key under a prefix, recursively (no directories: object stores have none);
- ``delete`` / ``delete_tree`` / ``move``;
- ``staging_for`` + ``publish``: where to write a tree of files that becomes visible under its final
  key in one step. Locally that is a ``.tmp-`` directory renamed into place; on an object store the
  files go straight to their final keys. Either way a *small marker object written last* (COMMIT,
  manifest.json) is the commit point, never the rename: readers ignore a tree without its marker.

``local_path`` hands out a real path for the few readers that need one (memory-mapped shards,
DeepSpeed's own checkpoint files); a store without local files refuses it, and its caller stages
the files into a local cache instead.

`LocalStorage` is this module's implementation; `pipeline.objstore.ObjectStorage` is the object-store
one (``s3://``), which ``open_storage`` returns for a URI. Run and dataset directories on an object
store are worked on through a local mirror (`pipeline.mirror`), so most code only ever sees
`LocalStorage`.

A full disk is one error, `NoSpace` (``no space left on device writing X (needs ~N MB, M MB
free)``), raised by every write here and, through `check_space`, by the writers that stream into
real files themselves (shards); it is an `OSError` too, so code that retries on I/O errors still
sees it. A write that fails leaves no ``NAME.tmp`` behind and never replaces the key.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ConfigError, UserError

STAGING_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class StorageError(UserError):
    """A key that is missing, escapes its root, or cannot be read or written."""


_FULL = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL = 1 << 20  # free bytes below which a short write without an errno means a full disk


def megabytes(n: int) -> str:
    """``12 MB``, ``0.4 MB``, ``0.0021 MB`` (10^6 bytes: what ``df -H`` shows)."""
    mb = max(n, 0) / 1e6
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.1f} MB" if mb >= 0.1 else f"{mb:.2g} MB"


class NoSpace(StorageError, OSError):
    """The filesystem holding a file is full (or over quota): names the file, about how much the
    write needed and what is free, so the way out (free space, or point the directory elsewhere) is
    plain from one line."""

    def __init__(self, path, needed: int, free: int):
        self.path, self.needed, self.free = str(path), int(needed), int(free)
        super().__init__(f"no space left on device writing {path} (needs ~{megabytes(needed)}, "
                         f"{megabytes(free)} free)")
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return str(self.args[0])


def free_bytes(path: str | Path) -> int:
    """Bytes free to an unprivileged writer on the filesystem holding ``path`` (its nearest
    existing parent when it does not exist yet)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def check_space(exc: OSError, path: str | Path, needed: int = 0) -> None:
    """Raise `NoSpace` for ``path`` when ``exc`` says the disk is full; otherwise return (the caller
    re-raises ``exc``). For writers that stream into real files themselves (shards, scratch files).

    A short write reported without an errno (numpy's ``tofile``: "N requested and M written") on a
    filesystem with (almost) nothing free counts as a full disk too."""
    if isinstance(exc, NoSpace):
        return
    code = getattr(exc, "errno", None)
    if code not in _FULL and not (code is None and free_bytes(path) < _NEARLY_FULL):
        return
    raise NoSpace(path, needed, free_bytes(path)) from None


def _written(f, tmp: Path) -> int:
    """Bytes a stream had taken when its write failed (what reached the disk, or its position)."""
    for size in (lambda: f.tell(), lambda: tmp.stat().st_size):
        with contextlib.suppress(OSError, ValueError):
            return size()
    return 0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStorage:
    """Keys are files under ``root`` on a local (or shared POSIX) filesystem."""

    scheme = "file"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    # ------------------------------------------------------------------ naming
    def path(self, key: str = "") -> Path:
        """The local path of ``key`` (for messages, and for readers that need a real file)."""
        return self.root / key if key else self.root

    def local_path(self, key: str = "") -> Path:
        return self.path(key)

    def inside(self, key: str) -> bool:
        """Whether ``key`` resolves (symlinks followed) inside the root: manifest and COMMIT entries
        must never point elsewhere."""
        return (self.root / key).resolve().is_relative_to(self.root.resolve())

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.root / prefix)

    # ------------------------------------------------------------------ reading
    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def has_prefix(self, prefix: str) -> bool:
        """Whether anything is stored under ``prefix`` (a "directory" that exists)."""
        return (self.root / prefix).is_dir()

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.path(key)}: missing") from None
        except IsADirectoryError:
            raise StorageError(f"{self.path(key)}: a directory, expected a file") from None

    def read_text(self, key: str) -> str:
        """Strict UTF-8 (a flipped byte is an error, never a replacement character)."""
        return self.read_bytes(key).decode("utf-8")

    def open_read(self, key: str) -> BinaryIO:
        return open(self.root / key, "rb")

    def size(self, key: str) -> int:
        return (self.root / key).stat().st_size

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with open(self.root / key, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, recursively, sorted (symlinks are listed, not followed)."""
        base = self.root / prefix
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root)
            keys.extend((rel / f).as_posix() for f in filenames)
            keys.extend((rel / d).as_posix() for d in dirnames if (Path(dirpath) / d).is_symlink())
        return sorted(k.removeprefix("./") for k in keys)

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` that hold keys (object stores: common prefixes)."""
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())

    # ------------------------------------------------------------------ writing
    def write_atomic(self, key: str, data: bytes | str, fsync: bool = False) -> None:
        """``key`` holds ``data`` whole, or keeps what it held: never a torn write."""
        payload = data.encode("utf-8") if isinstance(data, str) else data
        try:
            with self.open_atomic(key, fsync=fsync) as f:
                f.write(payload)
        except NoSpace as exc:
            raise NoSpace(exc.path, max(exc.needed, len(payload)), exc.free) from None

    @contextlib.contextmanager
    def open_atomic(self, key: str, fsync: bool = False) -> Iterator[BinaryIO]:
        """A binary file to stream into; it becomes ``key`` only when the block ends without error."""
        final = self.root / key
        # one writer per key at a time (locks, rank 0, one eval job), so the name can be fixed: a
        # crash leaves ``NAME.tmp`` debris that the next write of the key replaces
        tmp = final.with_name(f"{final.name}.tmp")
        f = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                yield f
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            _publish_file(tmp, final)
        except OSError as exc:
            needed = _written(f, tmp) if f is not None else 0
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # before measuring what is free: the torn file is not kept
            check_space(exc, final, needed)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def append_text(self, key: str, text: str) -> None:
        """Append to a log (metrics.jsonl). Object stores cannot append: they upload the whole log."""
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            check_space(exc, path, len(text.encode("utf-8")))
            raise

    def makedirs(self, prefix: str = "") -> None:
        """Local directories some writers (DeepSpeed, memory maps) need to exist; a no-op on object stores."""
        try:
            (self.root / prefix).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            check_space(exc, self.root / prefix)
            raise

    def move(self, src: str, dst: str) -> None:
        """One file to a new key (replacing what is there)."""
        target = self.root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        _publish_file(self.root / src, target)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()

    def delete_tree(self, prefix: str) -> None:
        """Every key under ``prefix`` (what is left of it when a crash cuts this short is debris)."""
        base = self.root / prefix
        if base.is_symlink() or base.is_file():
            base.unlink()
        elif base.exists():
            shutil.rmtree(base, ignore_errors=False)

    # ------------------------------------------------------------------ publishing a tree
    def staging_for(self, key: str) -> str:
        """Where to write the files of the tree ``key`` before `publish` (local: ``.tmp-NAME``)."""
        parent, _, name = key.rpartition("/")
        return f"{parent}/{STAGING_PREFIX}{name}" if parent else f"{STAGING_PREFIX}{name}"

    def publish(self, staged: str, key: str) -> None:
        """Make the tree written under ``staged`` visible as ``key`` (replacing debris there). Not the
        commit point: the marker written into it afterwards is."""
        if staged == key:
            return
        self.delete_tree(key)
        os.rename(self.root / staged, self.root / key)


def _publish_file(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def publish_local_file(src: str | Path, dst: str | Path) -> None:
    """A finished download or staged file takes its final local name in one step."""
    _publish_file(Path(src), Path(dst))


def open_storage(location: str | Path):
    """The storage for a run or dataset directory given as a path or URI: `LocalStorage` for a path
    (or ``file://``), `pipeline.objstore.ObjectStorage` for ``s3://``, ``gs://``, ``az://``."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    if sep and scheme != "file":
        from pipeline.objstore import ObjectStorage

        return ObjectStorage(text)
    return LocalStorage(text.removeprefix("file://") if sep else text)
