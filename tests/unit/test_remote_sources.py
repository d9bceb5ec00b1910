"""Inputs on object storage: corpus sources streamed from ``s3://`` (a prefix read like a local
directory, one object), a tokenizer and a ``model.init_from`` directory copied into the node cache.
Against a real S3 API server on loopback (moto's server: an emulator of the S3 API, not AWS) through
the real clients (s3fs/botocore, pyarrow over our ranged stream)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from pipeline import objstore
from pipeline.config import ConfigError, DataConfig, ModelConfig, SourceConfig, load_config
from pipeline.data import remote_sources
from pipeline.data.sources import Corpus, list_source_files, read_file
from pipeline.data.stages import input_hashes
from pipeline.data.tokenizer import load_tokenizer, tokenizer_file
from pipeline.models import build_model, initial_model, state_dict_for_save
from pipeline.models.hf import export_to_hf
from pipeline.objstore import ObjectStorage, ObjectStoreError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_clients():
    objstore._FILESYSTEMS.clear()  # each test's environment (endpoint, credentials) is its own
    remote_sources._SEEN.clear()
    yield
    objstore._FILESYSTEMS.clear()
    remote_sources._SEEN.clear()


def _jsonl(texts) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _corpus_dir(root: Path) -> Path:
    """One file of every format the readers know, in a nested folder, with a hidden one to skip."""
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "a.jsonl").write_bytes(_jsonl(["alpha one", "alpha two"]) + b"not json\n")
    (root / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(["beta gz"])))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(["gamma zst", "gamma two"])))
    (root / "d.txt").write_bytes(b"a plain text document\r\nover two lines")
    pq.write_table(pa.table({"text": ["parquet row 0", "parquet row 1", None]}), root / "e.parquet",
                   row_group_size=1)
    (root / "sub" / "f.jsonl").write_bytes(_jsonl(["nested"]))
    (root / ".cache" / "x.jsonl").write_bytes(_jsonl(["hidden: never read"]))
    return root


def _upload(local: Path, uri: str) -> None:
    store = ObjectStorage(uri)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            store.put_file(p, p.relative_to(local).as_posix())


def _records(files, src: SourceConfig):
    return [(r.line, r.text, r.reason.split(":")[0] if r.reason else None) for f in files
            for r in read_file(f, src.text_field, src.text_unit)]


def test_a_prefix_reads_like_the_same_local_directory(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(objstore, "_CHUNK", 64)  # many ranged GETs per object: the stream is exercised
    local = _corpus_dir(tmp_path / "corpus")
    uri = f"s3://{s3.bucket}/corpora/web"
    _upload(local, uri)
    ObjectStorage(f"s3://{s3.bucket}/corpora").write_atomic("web-other.jsonl", _jsonl(["not under web/"]))
    here, there = SourceConfig(path=str(local)), SourceConfig(path=uri + "/")
    lf, rf = list_source_files(here, 0), list_source_files(there, 0)
    assert [f.path for f in rf] == [f"{uri}/{n}" for n in
                                    ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.txt", "e.parquet", "sub/f.jsonl")]
    assert [f.format for f in rf] == [f.format for f in lf] == ["jsonl", "jsonl", "jsonl", "text", "parquet", "jsonl"]
    assert _records(rf, there) == _records(lf, here)
    assert ("parquet row 1" in [t for _, t, _ in _records(rf, there)])
    # what the stages record: the store's sizes, and an ETag fingerprint instead of a read
    cfg = DataConfig(sources=[there], output_dir=str(tmp_path / "out"))
    corpus = Corpus(cfg)
    assert corpus.input_bytes == sum(p.stat().st_size for p in local.rglob("*")
                                     if p.is_file() and ".cache" not in p.parts)
    hashes = input_hashes(corpus.files)
    infos = ObjectStorage(uri).infos()
    assert hashes[f"{uri}/a.jsonl"] == f"etag:{infos['a.jsonl'].etag}:{infos['a.jsonl'].size}"
    assert corpus.items()[0]["path"] == f"{uri}/a.jsonl"  # Ray's read tasks get the URI itself


def test_one_object_and_a_cut_gzip_on_the_store(s3):
    store = ObjectStorage(f"s3://{s3.bucket}")
    whole = gzip.compress(_jsonl([f"doc {i} " * 50 for i in range(200)]))
    store.write_atomic("cut.jsonl.gz", whole[: len(whole) // 2])
    src = SourceConfig(path=f"s3://{s3.bucket}/cut.jsonl.gz")
    files = list_source_files(src, 0)
    assert [(f.path, f.format) for f in files] == [(src.path, "jsonl")]
    records = list(read_file(files[0]))
    assert records[0].text and records[-1].text is None
    assert records[-1].reason.startswith(f"unreadable_file: truncated: the file ends at byte {len(whole) // 2:,}")


def test_a_missing_prefix_a_wrong_bucket_and_a_saved_dataset_are_one_line(s3):
    with pytest.raises(ConfigError, match=rf"^data.sources.0.path: no object or prefix s3://{s3.bucket}/gone on"):
        list_source_files(SourceConfig(path=f"s3://{s3.bucket}/gone"), 0)
    with pytest.raises(ObjectStoreError, match=r"^data.sources.1.path: s3://no-such-bucket-x: bucket "
                                               r"'no-such-bucket-x' does not exist"):
        list_source_files(SourceConfig(path="s3://no-such-bucket-x/a.jsonl"), 1)
    store = ObjectStorage(f"s3://{s3.bucket}/saved")
    for key in ("state.json", "dataset_info.json", "data-00000-of-00001.arrow"):
        store.write_atomic(key, b"{}")
    with pytest.raises(ConfigError, match=r"datasets.save_to_disk; .* copy it locally"):
        list_source_files(SourceConfig(path=f"s3://{s3.bucket}/saved"), 0)
    with pytest.raises(ConfigError, match=r"data.sources.0.format: hf .* cannot be read from object storage"):
        list_source_files(SourceConfig(path=f"s3://{s3.bucket}/saved", format="hf"), 0)


def test_a_tokenizer_on_the_store_is_cached_verified_and_reused(s3, tmp_path):
    from tokenizers import Tokenizer, models

    store = ObjectStorage(f"s3://{s3.bucket}/tok")
    store.write_atomic("tokenizer.json", Tokenizer(models.BPE()).to_str())
    uri = f"s3://{s3.bucket}/tok/tokenizer.json"
    path = tokenizer_file(uri)
    assert path == Path(os.environ["PRETRAIN_CACHE_DIR"]) / "inputs/s3" / s3.bucket / "tok/tokenizer.json"
    assert load_tokenizer(uri).get_vocab_size() == 0
    first = path.stat().st_mtime_ns
    assert tokenizer_file(uri) == path and path.stat().st_mtime_ns == first  # reused, not fetched again
    store.write_atomic("tokenizer.json", Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).to_str())
    assert load_tokenizer(uri).get_vocab_size() == 1  # changed on the store: fetched again
    with pytest.raises(ConfigError, match=rf"^data.tokenizer.path: no object or prefix s3://{s3.bucket}/tok/nope"):
        tokenizer_file(f"s3://{s3.bucket}/tok/nope.json")


def test_init_from_a_transformers_directory_on_the_store(s3, tmp_path):
    cfg = ModelConfig(arch="gpt", n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=40, vocab_size=120,
                      pad_vocab_to_multiple_of=1)
    torch.manual_seed(0)
    exported = state_dict_for_save(build_model(cfg))
    out = export_to_hf(exported, cfg, tmp_path / "hf")
    uri = f"s3://{s3.bucket}/models/tiny"
    _upload(Path(out), uri)
    loaded = load_config(None, [f"model.init_from={uri}", "model.pad_vocab_to_multiple_of=1", "train.seq_len=32"])
    assert (loaded.model.n_layer, loaded.model.d_model, loaded.model.vocab_size) == (2, 32, 120)  # config.json only
    cache = Path(os.environ["PRETRAIN_CACHE_DIR"]) / "inputs/s3" / s3.bucket / "models/tiny"
    assert not cache.exists()  # the weights come when they are loaded, not at config time
    got = state_dict_for_save(initial_model(loaded.model))
    assert got.keys() == exported.keys() and all(torch.equal(got[k], exported[k]) for k in got)
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in Path(out).iterdir())
    with pytest.raises(ConfigError, match=rf"model.init_from: no s3://{s3.bucket}/models/gone/config.json"):
        load_config(None, [f"model.init_from=s3://{s3.bucket}/models/gone"])


def test_init_from_an_unreachable_endpoint_is_one_line(s3, monkeypatch):
    monkeypatch.setattr(objstore, "BACKOFF_S", 0.001)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"model.init_from: s3://b-x: cannot reach the object store at "
                                          r"http://127.0.0.1:9 \(connection, after 6 attempts\)") as err:
        load_config(None, ["model.init_from=s3://b-x/models/tiny"])
    assert "\n" not in str(err.value)  # one line (a config error at load time: exit 2)
