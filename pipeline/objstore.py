"""Object storage (``s3://``, ``gs://``, ``az://``) behind the storage interface, through fsspec.

`ObjectStorage` speaks in the same keys as `LocalStorage` (``checkpoints/step_00000010/COMMIT``
under a ``s3://bucket/prefix`` root) and offers what an object store can do: whole-object PUT and
GET, streamed ranged reads, listing, delete, and a conditional create (``If-None-Match: *``) for
the run lock. There is no rename and no append: a tree becomes visible by the marker object
written last (COMMIT, manifest.json), and a log is uploaded whole.

The client is fsspec's (``s3fs`` for S3; ``gcsfs`` and ``adlfs`` when the user installs them).
Endpoint and credentials come from the standard environment only (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE``), so MinIO, Ceph RGW, R2 and AWS work unchanged and nothing secret ever enters a
config, a record or a log.

Every request goes through `_call`: transient failures (5xx, throttling, a dropped or refused
connection, a timeout) are retried with exponential backoff and counted in `RETRIES`; the client's
own silent retries are turned off so that the count is the truth. A failure that is not transient,
or that outlasts the retries, becomes one `ObjectStoreError` line naming the URI and what is wrong
(no such bucket, no credentials, access denied, endpoint unreachable).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ConfigError, UserError

#: URI schemes and the fsspec package that serves each
BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_CHUNK = 8 << 20
_PART = 32 << 20  # files larger than this download in parallel ranges of this size
ATTEMPTS = 6
BACKOFF_S = 0.2


class ObjectStoreError(UserError):
    """An object-store request failed for good: names the URI and what is wrong."""


class ChecksumMismatch(ObjectStoreError):
    """A downloaded object's sha256 is not the one its manifest or COMMIT records."""


def is_uri(location) -> bool:
    """Whether ``location`` names an object store (``s3://…``) rather than a local path."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme != "file"


def split_uri(uri: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` → ``("s3", "bucket", "a/b")``; a config error for an unknown scheme."""
    scheme, _, rest = str(uri).partition("://")
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise ConfigError(f"{uri}: unknown storage scheme {scheme}://; use a local path or one of {known}")
    bucket, _, prefix = rest.strip("/").partition("/")
    if not bucket:
        raise ConfigError(f"{uri}: no bucket in the URI; write it as {scheme}://BUCKET/PREFIX")
    return scheme, bucket, prefix.strip("/")


CACHE_ENV = "PRETRAIN_CACHE_DIR"  # storage.cache_dir, passed on to every rank through the environment


def cache_root() -> Path:
    """This node's cache for object-store data: ``$PRETRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pretrain``,
    else ``~/.cache/pretrain``. Node-local by design: every node stages its own copy."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().absolute() / "pretrain"


def mirror_path(uri: str, kind: str) -> Path:
    """The local mirror of a run (``kind="runs"``) or dataset (``"data"``) directory on an object
    store: ``CACHE/kind/s3/bucket/prefix``."""
    scheme, bucket, prefix = split_uri(uri)
    return cache_root() / kind / scheme / bucket / (prefix or "_root")


def mirrored_uri(path, kind: str) -> str | None:
    """The URI a local mirror path stands for (`mirror_path` backwards), None for any other path:
    a command handed a mirror still reaches the store (its lease, its uploads)."""
    try:
        rel = Path(path).absolute().relative_to(cache_root() / kind)
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 3 or parts[0] not in BACKENDS:
        return None
    prefix = "" if parts[2:] == ("_root",) else "/".join(parts[2:])
    return f"{parts[0]}://{parts[1]}" + (f"/{prefix}" if prefix else "")


# ---------------------------------------------------------------------------------------- retries


class RetryCounter:
    """How many requests were retried, by reason (thread-safe; one per process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.requests = 0

    def request(self) -> None:
        with self._lock:
            self.requests += 1

    def retried(self, reason: str) -> None:
        with self._lock:
            self.by_reason[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> str | None:
        """``storage: 12 of 340 requests retried (503 ×10, connection ×2)``, None when none was."""
        if not self.total:
            return None
        reasons = ", ".join(f"{r} ×{n}" for r, n in self.by_reason.most_common())
        return f"storage: {self.total} of {self.requests} object-store requests retried ({reasons})"


RETRIES = RetryCounter()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status_and_code(exc: BaseException) -> tuple[int | None, str]:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return status, str(response["Error"].get("Code", ""))
    return None, ""


_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException", "503", "500", "502", "504"}
_CONNECTION_NAMES = ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                     "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ClientPayloadError",
                     "IncompleteRead", "ResponseParserError", "ProxyConnectionError", "HTTPClientError")


def transient_reason(exc: BaseException) -> str | None:
    """Why a failed request is worth retrying (``"503"``, ``"connection"``, ``"timeout"``), or None."""
    status, code = _status_and_code(exc)
    if (status is not None and status >= 500) or code in _TRANSIENT_CODES:
        return str(status or code)
    for e in _chain(exc):
        name = type(e).__name__
        if name in _CONNECTION_NAMES or isinstance(e, (ConnectionError, TimeoutError)):
            return "timeout" if "Timeout" in name or isinstance(e, TimeoutError) else "connection"
    return None


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def describe_failure(uri: str, exc: BaseException) -> str:
    """One line: the URI and what is wrong with it, with the way out."""
    status, code = _status_and_code(exc)
    names = {type(e).__name__ for e in _chain(exc)}
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return (f"{uri}: no object-store credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE) in the environment")
    if code == "NoSuchBucket":
        return f"{uri}: bucket {split_uri(uri)[1]!r} does not exist at {_endpoint()}; create it or fix the URI"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken") or status == 403:
        return (f"{uri}: access denied ({code or status}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the "
                f"bucket's policy")
    reason = transient_reason(exc)
    if reason in ("connection", "timeout"):
        return (f"{uri}: cannot reach the object store at {_endpoint()} ({reason}, after {ATTEMPTS} attempts); "
                f"check AWS_ENDPOINT_URL and the network")
    if reason:
        return f"{uri}: the object store kept failing ({reason}, after {ATTEMPTS} attempts); try again later"
    return f"{uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else code or 'failed'}"


def _call(uri: str, fn: Callable, *args, **kwargs):
    """``fn(*args)`` with transient failures retried (backoff, counted); FileNotFoundError and
    FileExistsError pass through for the caller to decide; anything else is one ObjectStoreError."""
    for attempt in range(ATTEMPTS):
        RETRIES.request()
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError) as exc:
            if _status_and_code(exc)[1] == "NoSuchBucket":
                raise ObjectStoreError(describe_failure(uri, exc)) from None
            raise
        except Exception as exc:  # noqa: BLE001 - every client error is sorted into retry or one line
            reason = transient_reason(exc)
            if reason is None or attempt == ATTEMPTS - 1:
                raise ObjectStoreError(describe_failure(uri, exc)) from None
            RETRIES.retried(reason)
            time.sleep(min(BACKOFF_S * 2 ** attempt, 5.0))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------- the client


_FILESYSTEMS: dict[str, object] = {}
_FS_LOCK = threading.Lock()


def filesystem(scheme: str):
    """fsspec's filesystem for ``scheme``, its own retries off (ours count), one per process."""
    with _FS_LOCK:
        if scheme in _FILESYSTEMS and _FILESYSTEMS[scheme][0] == os.getpid():
            return _FILESYSTEMS[scheme][1]
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with datasets
            raise ConfigError(f"{scheme}:// needs fsspec: pip install fsspec {BACKENDS[scheme]}") from None
        options: dict = {}
        if scheme == "s3":
            options = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"},
                                                      "connect_timeout": 10, "read_timeout": 60}}
        try:
            fs = fsspec.filesystem(scheme, skip_instance_cache=True, **options)
        except ImportError:
            raise ConfigError(f"{scheme}:// locations need the {BACKENDS[scheme]} package: "
                              f"pip install {BACKENDS[scheme]}") from None
        if scheme == "s3":
            fs.retries = 1  # s3fs's own silent retries: one attempt, `_call` retries and counts
        _FILESYSTEMS[scheme] = (os.getpid(), fs)
        return fs


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStorage:
    """Keys are objects under ``scheme://bucket/prefix``."""

    def __init__(self, uri: str):
        self.scheme, self.bucket, self.prefix = split_uri(uri)
        self.uri = f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.root = self.uri

    def __repr__(self) -> str:
        return f"ObjectStorage({self.uri!r})"

    @property
    def fs(self):
        return filesystem(self.scheme)

    # ------------------------------------------------------------------ naming
    def _full(self, key: str = "") -> str:
        """The client's path (``bucket/prefix/key``)."""
        parts = [self.bucket, self.prefix, key.strip("/")]
        return "/".join(p for p in parts if p)

    def path(self, key: str = "") -> str:
        """The URI of ``key`` (for messages)."""
        return f"{self.scheme}://{self._full(key)}"

    def local_path(self, key: str = "") -> Path:
        raise ObjectStoreError(f"{self.path(key)}: an object store has no local path; stage it into the cache")

    def inside(self, key: str) -> bool:
        return ".." not in key.split("/") and not key.startswith("/")

    def child(self, prefix: str) -> ObjectStorage:
        return ObjectStorage(self.path(prefix))

    # ------------------------------------------------------------------ reading
    def check(self) -> None:
        """One cheap request that fails with a clear line when the bucket, the credentials or the
        endpoint are wrong: for the parent to call before any rank starts."""
        _call(self.uri, self.fs.ls, self.bucket, detail=False, refresh=True)

    def infos(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """Every object under ``prefix`` (recursive) with its size and ETag, by key."""
        base = self._full(prefix)
        try:
            found = _call(self.uri, self.fs.find, base, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        root = self._full() + "/"
        out = {}
        for full, info in found.items():
            if info.get("type") == "directory" or not full.startswith(root):
                continue
            key = full[len(root):]
            out[key] = ObjectInfo(key, int(info.get("size") or 0), str(info.get("ETag", "")).strip('"'))
        return dict(sorted(out.items()))

    def list(self, prefix: str = "") -> list[str]:
        keys = list(self.infos(prefix))
        return [k.removeprefix(prefix.rstrip("/") + "/") if prefix else k for k in keys]

    def children(self, prefix: str = "") -> list[str]:
        base = self._full(prefix)
        try:
            entries = _call(self.uri, self.fs.ls, base, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def exists(self, key: str) -> bool:
        try:
            info = _call(self.uri, self.fs.info, self._full(key), refresh=True)
        except FileNotFoundError:
            return False
        return info.get("type") != "directory"

    def has_prefix(self, prefix: str) -> bool:
        return bool(self.infos(prefix))

    def read_bytes(self, key: str) -> bytes:
        try:
            return _call(self.uri, self.fs.cat_file, self._full(key))
        except FileNotFoundError:
            raise ObjectStoreError(f"{self.path(key)}: missing") from None

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def size(self, key: str) -> int:
        try:
            return int(_call(self.uri, self.fs.info, self._full(key))["size"])
        except FileNotFoundError:
            raise ObjectStoreError(f"{self.path(key)}: missing") from None

    def open_read(self, key: str) -> BinaryIO:
        """A seekable stream of ranged GETs (nothing is downloaded whole); a read that fails on a
        transient error is retried from where it was."""
        return _RetryingReader(self, key)

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self.open_read(key) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # ------------------------------------------------------------------ writing
    def write_atomic(self, key: str, data: bytes | str, fsync: bool = False) -> None:
        """One PUT: the object appears whole or not at all."""
        payload = data.encode("utf-8") if isinstance(data, str) else data
        _call(self.uri, self.fs.pipe_file, self._full(key), payload)

    def create_exclusive(self, key: str, data: bytes | str) -> bool:
        """PUT with ``If-None-Match: *``: True when this call created ``key``, False when it existed."""
        payload = data.encode("utf-8") if isinstance(data, str) else data
        try:
            _call(self.uri, self.fs.pipe_file, self._full(key), payload, mode="create")
        except FileExistsError:
            return False
        return True

    @contextlib.contextmanager
    def open_atomic(self, key: str, fsync: bool = False) -> Iterator[BinaryIO]:
        """A local temporary file to stream into, uploaded as ``key`` when the block ends without
        error (nothing is uploaded otherwise)."""
        with tempfile.NamedTemporaryFile(prefix="upload-", suffix=".part") as tmp:
            yield tmp
            tmp.flush()
            self.put_file(tmp.name, key)

    def put_file(self, local: str | Path, key: str) -> None:
        _call(self.uri, self.fs.put_file, str(local), self._full(key))

    def append_text(self, key: str, text: str) -> None:
        """Object stores cannot append: read, add, upload whole (for small logs only)."""
        old = self.read_bytes(key) if self.exists(key) else b""
        self.write_atomic(key, old + text.encode("utf-8"))

    def makedirs(self, prefix: str = "") -> None:
        """Object stores have no directories."""

    def move(self, src: str, dst: str) -> None:
        _call(self.uri, self.fs.copy, self._full(src), self._full(dst))
        self.delete(src)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            _call(self.uri, self.fs.rm_file, self._full(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._full(k) for k in keys]
        if paths:
            with contextlib.suppress(FileNotFoundError):
                _call(self.uri, self.fs.rm, paths)

    def delete_tree(self, prefix: str) -> None:
        self.delete_many(f"{prefix.rstrip('/')}/{k}" for k in self.list(prefix))

    def staging_for(self, key: str) -> str:
        """Objects go straight to their final keys; the marker written last commits them."""
        return key

    def publish(self, staged: str, key: str) -> None:
        if staged != key:
            for name in self.list(staged):
                self.move(f"{staged}/{name}", f"{key}/{name}")

    # ------------------------------------------------------------------ bulk transfers
    def download(self, key: str, dest: str | Path, expected_sha: str | None = None, size: int | None = None,
                 pool: ThreadPoolExecutor | None = None) -> str:
        """``key`` into the local file ``dest`` (the caller's temporary name: it renames the file
        into place when whole); large objects in parallel ranges on ``pool``. Returns its sha256;
        raises ChecksumMismatch, and removes ``dest``, when it is not ``expected_sha``."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = self.size(key) if size is None else size
        try:
            self._fetch_into(key, dest, size, pool)
            digest = _file_sha256(dest)
            if expected_sha is not None and digest != expected_sha:
                raise ChecksumMismatch(f"{self.path(key)}: sha256 {digest[:12]}… does not match the recorded "
                                       f"{expected_sha[:12]}…; the object was altered after it was committed")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise
        return digest

    def _fetch_into(self, key: str, part: Path, size: int, pool: ThreadPoolExecutor | None) -> None:
        full = self._full(key)
        with open(part, "wb") as f:
            f.truncate(size)
        ranges = [(s, min(s + _PART, size)) for s in range(0, size, _PART)] or [(0, 0)]
        if len(ranges) == 1:
            data = _call(self.uri, self.fs.cat_file, full) if size else b""
            part.write_bytes(data)
            return

        def fetch(span):
            data = _call(self.uri, self.fs.cat_file, full, start=span[0], end=span[1])
            with open(part, "r+b") as f:
                f.seek(span[0])
                f.write(data)

        if pool is None:
            with ThreadPoolExecutor(max_workers=8) as own:
                list(own.map(fetch, ranges))
        else:
            list(pool.map(fetch, ranges))

    def download_many(self, items: list[tuple[str, Path, str | None, int | None]], workers: int = 16) -> int:
        """Download ``(key, dest, sha256, size)`` items in parallel (whole files and the ranges of
        large ones); the bytes fetched. Every item is verified; the first mismatch is raised."""
        if not items:
            return 0
        ranges = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ranges")
        try:
            with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="objects") as files:
                futures = [files.submit(self.download, k, d, s, n, ranges) for k, d, s, n in items]
                for f in futures:
                    f.result()
        finally:
            ranges.shutdown(wait=True)
        return sum(n or 0 for *_, n in items)

    def upload_many(self, items: list[tuple[str | Path, str]], workers: int = 8) -> None:
        """Upload ``(local file, key)`` pairs in parallel."""
        if not items:
            return
        with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="uploads") as pool:
            for f in [pool.submit(self.put_file, local, key) for local, key in items]:
                f.result()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _RetryingReader(io.RawIOBase):
    """A read-only, seekable stream over one object: each read is a ranged GET of at least
    ``_CHUNK`` bytes (buffered), retried on transient failures from the same offset."""

    def __init__(self, store: ObjectStorage, key: str):
        super().__init__()
        self.store, self.key, self.pos = store, key, 0
        self.length = store.size(key)
        self._buf, self._buf_at = b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _fill(self) -> None:
        end = min(self.pos + _CHUNK, self.length)
        self._buf = _call(self.store.uri, self.store.fs.cat_file, self.store._full(self.key), start=self.pos, end=end)
        self._buf_at = self.pos

    def readinto(self, b) -> int:
        if self.pos >= self.length:
            return 0
        if not (self._buf_at <= self.pos < self._buf_at + len(self._buf)):
            self._fill()
        start = self.pos - self._buf_at
        n = min(len(b), len(self._buf) - start)
        b[:n] = self._buf[start:start + n]
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.length - self.pos
        out = bytearray()
        while len(out) < size and self.pos < self.length:
            chunk = bytearray(min(size - len(out), _CHUNK))
            n = self.readinto(chunk)
            if not n:
                break
            out += chunk[:n]
        return bytes(out)
