"""The shards are Megatron MMIDIDX files: checked with a reader written here from the format spec."""

import struct

import numpy as np
import pytest

from pipeline.data.shards import IndexedShard, RollingShardWriter, ShardError, ShardWriter, token_dtype

pytestmark = pytest.mark.unit


def read_megatron_index(path):
    """Independent decoder of the .idx layout (header, version, dtype code, counts, arrays)."""
    raw = open(path, "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", raw, 9)
    code, = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = np.frombuffer(raw, np.int32, n_seq, off); off += 4 * n_seq
    pointers = np.frombuffer(raw, np.int64, n_seq, off); off += 8 * n_seq
    docs = np.frombuffer(raw, np.int64, n_doc, off); off += 8 * n_doc
    assert off == len(raw)
    return version, code, lengths, pointers, docs


def test_writer_produces_megatron_layout(tmp_path):
    docs = [[1, 2, 3], [7], [65535, 0, 9, 9]]
    with ShardWriter(tmp_path / "s", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    version, code, lengths, pointers, doc_index = read_megatron_index(tmp_path / "s.idx")
    assert (version, code) == (1, 8)  # uint16
    assert lengths.tolist() == [3, 1, 4]
    assert pointers.tolist() == [0, 6, 8]  # byte offsets
    assert doc_index.tolist() == [0, 1, 2, 3]
    tokens = np.fromfile(tmp_path / "s.bin", dtype=np.uint16)
    assert [tokens[p // 2 : p // 2 + n].tolist() for p, n in zip(pointers, lengths)] == docs
    shard = IndexedShard(tmp_path / "s")
    assert [shard[i].tolist() for i in range(len(shard))] == docs


def test_token_dtype_fits_vocabulary():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


def test_truncated_index_and_short_bin_are_detected(tmp_path):
    with ShardWriter(tmp_path / "s", np.uint16) as w:
        w.add_document([1, 2, 3, 4])
    idx = (tmp_path / "s.idx").read_bytes()
    (tmp_path / "s.idx").write_bytes(idx[:-3])
    with pytest.raises(ShardError, match="s.idx"):
        IndexedShard(tmp_path / "s")
    (tmp_path / "s.idx").write_bytes(idx)
    (tmp_path / "s.bin").write_bytes((tmp_path / "s.bin").read_bytes()[:-2])
    with pytest.raises(ShardError, match="s.bin"):
        IndexedShard(tmp_path / "s")


def test_rolling_writer_cuts_shards_between_documents(tmp_path):
    w = RollingShardWriter(tmp_path, "train", "web", np.uint16, max_tokens=10)
    for n in (4, 4, 4, 4, 12, 1):
        w.add_document(list(range(n)))
    w.close()
    assert w.shards == ["train/web-00000", "train/web-00001", "train/web-00002"]
    sizes = [IndexedShard(tmp_path / p).sequence_lengths.tolist() for p in w.shards]
    assert sizes == [[4, 4, 4], [4, 12], [1]]
    assert w.documents == 6 and w.num_tokens == 29
