"""The object-store implementation of the storage interface, against a real S3 API server on
loopback (moto's server: an emulator of the S3 API, not AWS) through the real clients (s3fs/botocore)."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline import objstore
from pipeline.objstore import ChecksumMismatch, ObjectStorage, ObjectStoreError
from pipeline.storage import open_storage

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_clients():
    objstore._FILESYSTEMS.clear()  # each test's environment (endpoint, credentials) is its own
    yield
    objstore._FILESYSTEMS.clear()


def test_open_storage_gives_an_object_store_for_a_uri_and_keys_round_trip(s3):
    store = open_storage(f"s3://{s3.bucket}/runs/a")
    assert isinstance(store, ObjectStorage)
    store.write_atomic("checkpoints/step_00000002/COMMIT", '{"step": 2}')
    store.write_atomic("metrics.jsonl", b"one\n")
    store.append_text("metrics.jsonl", "two\n")
    assert store.read_text("metrics.jsonl") == "one\ntwo\n"
    assert store.list() == ["checkpoints/step_00000002/COMMIT", "metrics.jsonl"]
    assert store.list("checkpoints") == ["step_00000002/COMMIT"]
    assert store.children("checkpoints") == ["step_00000002"]
    assert store.exists("metrics.jsonl") and not store.exists("checkpoints")
    assert store.has_prefix("checkpoints") and not store.has_prefix("eval")
    assert store.path("metrics.jsonl") == f"s3://{s3.bucket}/runs/a/metrics.jsonl"
    assert s3.keys(s3.bucket) == ["runs/a/checkpoints/step_00000002/COMMIT", "runs/a/metrics.jsonl"]
    store.delete_tree("checkpoints")
    assert store.list() == ["metrics.jsonl"]
    with pytest.raises(ObjectStoreError, match="metrics.jsonl.gone: missing"):
        store.read_bytes("metrics.jsonl.gone")


def test_streamed_reads_are_ranged_and_seekable(s3, monkeypatch):
    monkeypatch.setattr(objstore, "_CHUNK", 1000)
    store = ObjectStorage(f"s3://{s3.bucket}/src")
    data = os.urandom(4321)
    store.write_atomic("big.bin", data)
    with store.open_read("big.bin") as f:
        assert f.read(10) == data[:10]
        f.seek(4000)
        assert f.read() == data[4000:]
    assert store.sha256("big.bin") == hashlib.sha256(data).hexdigest()


def test_conditional_create_is_won_once(s3):
    store = ObjectStorage(f"s3://{s3.bucket}")
    assert store.create_exclusive("run.lock", "a") is True
    assert store.create_exclusive("run.lock", "b") is False
    assert store.read_text("run.lock") == "a"


def test_parallel_download_verifies_every_object_and_leaves_nothing_on_a_mismatch(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(objstore, "_PART", 1 << 16)  # ranges of 64 KiB: a 300 KB object comes in 5 parts
    store = ObjectStorage(f"s3://{s3.bucket}/d")
    blobs = {f"train/s-{i:05d}.bin": os.urandom(300_000 + i) for i in range(3)}
    for key, data in blobs.items():
        store.write_atomic(key, data)
    items = [(k, tmp_path / k, hashlib.sha256(v).hexdigest(), len(v)) for k, v in blobs.items()]
    assert store.download_many(items, workers=4) == sum(len(v) for v in blobs.values())
    assert all((tmp_path / k).read_bytes() == v for k, v in blobs.items())
    bad = [("train/s-00000.bin", tmp_path / "bad.bin", "0" * 64, 300_000)]
    with pytest.raises(ChecksumMismatch, match=r"s3://.*/d/train/s-00000.bin: sha256 .* does not match"):
        store.download_many(bad)
    assert not (tmp_path / "bad.bin").exists()


def test_a_wrong_bucket_is_one_line_naming_the_uri(s3):
    with pytest.raises(ObjectStoreError) as err:
        ObjectStorage("s3://no-such-bucket-here/x").check()
    assert str(err.value).startswith("s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist")
    assert "\n" not in str(err.value)


def test_missing_credentials_are_one_line(s3, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ObjectStoreError, match=r"no object-store credentials found; set AWS_ACCESS_KEY_ID"):
        ObjectStorage(f"s3://{s3.bucket}").check()


def test_an_unreachable_endpoint_is_retried_then_one_line(s3, monkeypatch):
    monkeypatch.setattr(objstore, "BACKOFF_S", 0.01)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    before = objstore.RETRIES.total
    with pytest.raises(ObjectStoreError, match=r"cannot reach the object store at http://127.0.0.1:9"):
        ObjectStorage(f"s3://{s3.bucket}").check()
    assert objstore.RETRIES.total - before == objstore.ATTEMPTS - 1


def test_transient_faults_are_retried_and_counted(s3, monkeypatch):
    from helpers.s3 import FaultProxy

    monkeypatch.setattr(objstore, "BACKOFF_S", 0.01)
    with FaultProxy(s3.endpoint, fail_share=0.3, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        store = ObjectStorage(f"s3://{s3.bucket}/flaky")
        before = objstore.RETRIES.total
        for i in range(20):
            store.write_atomic(f"k{i}", f"v{i}")
        assert [store.read_text(f"k{i}") for i in range(20)] == [f"v{i}" for i in range(20)]
        assert proxy.failed_503 + proxy.dropped > 0
        # every 503 reaches us and is retried by us; a dropped keep-alive connection may instead be
        # re-sent by the HTTP client itself, below us
        assert proxy.failed_503 <= objstore.RETRIES.total - before <= proxy.failed_503 + proxy.dropped
    assert "object-store requests retried" in objstore.RETRIES.summary()


def test_unknown_schemes_and_bucketless_uris_are_config_errors():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ftp://x/y: unknown storage scheme ftp://"):
        objstore.split_uri("ftp://x/y")
    with pytest.raises(ConfigError, match=r"no bucket in the URI"):
        objstore.split_uri("s3://")
