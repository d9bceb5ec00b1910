"""`pretrain prepare` from sources on object storage to a dataset on object storage, against a real
S3 API server on loopback (moto's server: an emulator of the S3 API, not AWS) spoken to by the real
clients over HTTP; the faults come from a proxy in front of it (real 503s and dropped connections).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json

import pytest

from conftest import pretrain, write_corpus
from helpers.s3 import FaultProxy
from pipeline import objstore
from pipeline.config import load_config
from pipeline.data import remote_sources
from pipeline.objstore import ObjectStoreError

pytestmark = pytest.mark.e2e


def _sources_on_the_store(s3, tmp_path) -> str:
    """A two-file corpus (plain jsonl and jsonl.gz) under ``s3://BUCKET/corpus/``; its URI."""
    local = tmp_path / "docs.jsonl"
    write_corpus(local, 80)
    lines = local.read_bytes().splitlines(keepends=True)
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="corpus/part-0.jsonl", Body=b"".join(lines[:40]))
    c.put_object(Bucket=s3.bucket, Key="corpus/part-1.jsonl.gz", Body=gzip.compress(b"".join(lines[40:])))
    return f"s3://{s3.bucket}/corpus/"


def _sets(s3, sources: str) -> list[str]:
    sets = [f"data.output_dir=s3://{s3.bucket}/datasets/demo", f"data.sources=[{{path: '{sources}', name: web}}]",
            "data.tokenizer.vocab_size=512", "data.executor=local", "data.num_cpus=1"]
    return [a for s in sets for a in ("--set", s)]


def _objects(s3, prefix: str) -> dict[str, bytes]:
    c = s3.client()
    return {k.removeprefix(prefix): c.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in s3.keys(s3.bucket, prefix)}


def test_prepare_from_and_to_the_store_commits_a_manifest_last_and_reruns_as_a_no_op(s3, tmp_path):
    sources = _sources_on_the_store(s3, tmp_path)
    sets = _sets(s3, sources)
    first = pretrain("prepare", "configs/demo.yaml", *sets)
    objects = _objects(s3, "datasets/demo/")
    manifest = json.loads(objects["manifest.json"])
    assert manifest["files"] and all(
        hashlib.sha256(objects[name]).hexdigest() == sha for name, sha in manifest["files"].items())
    assert any(k.startswith("train/web-") and k.endswith(".bin") for k in objects)
    assert "prepare.lock" not in objects and not any(k.startswith((".dedup-spill", ".append-staging")) for k in objects)
    # the inputs are named by their URIs and fingerprinted from the listing; no credential anywhere
    assert [i["file"] for i in manifest["inputs"]] == [f"{sources}part-0.jsonl", f"{sources}part-1.jsonl.gz"]
    assert all(i["sha256"].startswith("etag:") for i in manifest["inputs"])
    assert manifest["accounting"]["documents_in"] == 80
    assert "AWS_SECRET" not in objects["manifest.json"].decode() and "uploaded" in first.stdout
    stamps = {o["Key"]: o["ETag"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]}

    again = pretrain("prepare", "configs/demo.yaml", *sets)
    assert "up to date" in again.stdout and "uploaded" not in again.stdout
    assert {o["Key"]: o["ETag"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]} == stamps


def test_a_missing_source_prefix_is_one_line_before_any_work(s3, tmp_path):
    proc = pretrain("prepare", "configs/demo.yaml", *_sets(s3, f"s3://{s3.bucket}/nothing-here/"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"data.sources.0.path: no object or prefix s3://{s3.bucket}/nothing-here/ on the store; check the URI "
        f"(and that it was uploaded)")
    assert not [k for k in s3.keys(s3.bucket) if not k.endswith("prepare.lock")]


def test_an_interrupted_push_leaves_no_manifest_on_the_store_and_the_next_prepare_finishes_it(
        s3, tmp_path, monkeypatch):
    from pipeline.data import command

    sources = _sources_on_the_store(s3, tmp_path)
    cfg = load_config("configs/demo.yaml", [a for a in _sets(s3, sources) if a != "--set"])
    monkeypatch.setattr(objstore, "BACKOFF_S", 0.001)
    real_push = command.push_dataset
    with FaultProxy(s3.endpoint) as proxy:
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.setenv(key, proxy.endpoint)
        objstore._FILESYSTEMS.clear()
        remote_sources._SEEN.clear()

        def push_then_lose_the_store(ds, **kw):  # a few uploads get through, then every request fails
            proxy.grace, proxy.fail_share = proxy.requests + 3, 1.0
            return real_push(ds, **kw)

        monkeypatch.setattr(command, "push_dataset", push_then_lose_the_store)
        with pytest.raises(ObjectStoreError, match=rf"s3://{s3.bucket}/datasets/demo: "):
            command.run_prepare(cfg.data, contextlib.nullcontext)
        assert proxy.failed_503 + proxy.dropped > 0
        keys = s3.keys(s3.bucket, "datasets/demo/")
        assert keys and "datasets/demo/manifest.json" not in keys  # some files went up, never the manifest

        proxy.fail_share = 0.0
        monkeypatch.setattr(command, "push_dataset", real_push)
        command.run_prepare(cfg.data, contextlib.nullcontext)  # the mirror is prepared: only the push is left
    objects = _objects(s3, "datasets/demo/")
    manifest = json.loads(objects["manifest.json"])
    assert all(hashlib.sha256(objects[name]).hexdigest() == sha for name, sha in manifest["files"].items())


@pytest.mark.slow  # three prepares (~30 s on 2 cores)
def test_append_grows_a_dataset_on_the_store_with_a_new_object(s3, tmp_path):
    sources = _sources_on_the_store(s3, tmp_path)
    sets = _sets(s3, sources)
    pretrain("prepare", "configs/demo.yaml", *sets)
    extra = tmp_path / "more.jsonl"
    write_corpus(extra, 20, start=200)
    s3.client().put_object(Bucket=s3.bucket, Key="corpus/part-2.jsonl", Body=extra.read_bytes())
    out = pretrain("prepare", "configs/demo.yaml", *sets, "--append")
    assert "1 new input file(s)" in out.stdout, out.stdout
    objects = _objects(s3, "datasets/demo/")
    manifest = json.loads(objects["manifest.json"])
    assert manifest["accounting"]["documents_in"] == 100 and len(manifest["lineage"]) == 1
    assert [i["file"] for i in manifest["inputs"]][-1] == f"{sources}part-2.jsonl"
    assert all(hashlib.sha256(objects[name]).hexdigest() == sha for name, sha in manifest["files"].items())
