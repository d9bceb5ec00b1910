"""`pretrain prepare`'s executors: the choice of `data.executor: auto`, the local executor's ordered
process pool, local dedup, and the filter verdicts that spare the later passes the quality filters."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest

from pipeline.config import CleanConfig, ConfigError, DataConfig, DedupConfig, load_config
from pipeline.data import executors, workers
from pipeline.data.dedup import Duplicate, find_duplicates_local, resolve
from pipeline.data.executors import LocalExecutor, choose_executor, input_bytes
from pipeline.data.sources import SourceFile, doc_ids

pytestmark = pytest.mark.unit

MiB = 1 << 20


def _choose(executor="auto", ray_address=None, env_address=None, size=3 * MiB, limit=256 * MiB, running=False):
    return choose_executor(executor, ray_address=ray_address, env_address=env_address, input_bytes=size,
                           local_max_bytes=limit, ray_running=running)


def test_auto_runs_a_small_corpus_locally_without_a_ray_address():
    name, why = _choose()
    assert name == "local"
    assert "3.0 MiB" in why and "local_max_bytes" in why and "no Ray address" in why
    assert _choose(size=256 * MiB)[0] == "local"  # the limit itself is still local


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"env_address": "ray://head:10001"}, "RAY_ADDRESS=ray://head:10001"),
    ({"ray_address": "auto"}, "--ray-address auto"),
    ({"size": 256 * MiB + 1}, "over data.local_max_bytes"),
    ({"size": 10, "limit": 0}, "over data.local_max_bytes"),
    ({"running": True}, "already running"),
])
def test_auto_picks_ray_for_an_address_a_large_input_or_a_running_ray(kwargs, named):
    name, why = _choose(**kwargs)
    assert name == "ray" and named in why


def test_a_forced_executor_wins_over_size_and_address():
    assert _choose("ray", size=1) == ("ray", "data.executor is ray")
    name, why = _choose("local", env_address="auto", size=10**12)
    assert name == "local" and "ignored" in why


def test_executor_fields_have_defaults_and_bad_values_name_the_field():
    cfg = load_config("configs/demo.yaml")
    assert cfg.data.executor == "auto" and cfg.data.local_max_bytes == 256 * MiB
    assert load_config("configs/demo.yaml", ["data.executor=local"]).data.executor == "local"
    with pytest.raises(ConfigError, match=r"data\.executor") as err:
        load_config("configs/demo.yaml", ["data.executor=spark"])
    assert "spark" in str(err.value)
    with pytest.raises(ConfigError, match=r"data\.local_max_bytes"):
        load_config("configs/demo.yaml", ["data.local_max_bytes=-1"])


def test_input_bytes_counts_every_file_once_and_whole_dataset_directories(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"x" * 100)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_bytes(b"y" * 10)
    (tmp_path / "hf" / "data.arrow").write_bytes(b"z" * 1000)
    files = [SourceFile(0, 0, str(tmp_path / "a.jsonl"), "jsonl"), SourceFile(1, 0, str(tmp_path / "hf"), "hf", "a"),
             SourceFile(1, 1, str(tmp_path / "hf"), "hf", "b")]
    assert input_bytes(files) == 1110


# ---- the local executor's pool ------------------------------------------------------------------

def _square_block(block: dict, offset: int) -> dict:
    if int(block["doc_id"][0]) == -1:
        raise ValueError("bad block")
    return {"doc_id": block["doc_id"], "value": block["doc_id"] ** 2 + offset}


def test_forked_pool_returns_every_block_in_order():
    blocks = ({"doc_id": np.arange(i * 3, i * 3 + 3)} for i in range(40))
    task = functools.partial(_square_block, offset=7)
    got = list(executors._in_order(task, blocks, processes=2))
    assert [int(b["doc_id"][0]) for b in got] == [i * 3 for i in range(40)]
    assert all((b["value"] == b["doc_id"] ** 2 + 7).all() for b in got)


def test_forked_pool_raises_a_worker_error_in_the_driver():
    blocks = [{"doc_id": np.arange(3)}, {"doc_id": np.array([-1])}, {"doc_id": np.arange(3)}]
    with pytest.raises(ValueError, match="bad block"):
        list(executors._in_order(functools.partial(_square_block, offset=0), iter(blocks), processes=2))


def test_local_executor_uses_num_cpus_processes(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert LocalExecutor(DataConfig(sources=[{"path": str(tmp_path / "a.jsonl")}], num_cpus=3)).processes == 3


# ---- local dedup, and the filter verdicts ------------------------------------------------------------

_rng = random.Random(3)
_WORDS = ["".join(_rng.choice("abcdefghij") for _ in range(_rng.randint(2, 7))) for _ in range(2000)]


def _corpus(rng: random.Random) -> list[str]:
    """Distinct documents, exact copies, near copies (one word changed), chains, and short ones."""
    docs = [" ".join(rng.choice(_WORDS) for _ in range(120)) for _ in range(60)]
    out = list(docs)
    for i in range(0, 60, 7):
        out.append(docs[i])  # exact
        words = docs[i + 1].split()
        words[60] = "changed"
        out.append(" ".join(words))  # near
        words[30] = "again"
        out.append(" ".join(words))  # near of the near copy
    out += ["tiny", "two words", "#" * 40 + " a b c d e f"]
    rng.shuffle(out)
    return out


def _blocks(texts: list[str], size: int) -> list[dict]:
    ids = doc_ids(0, 0, range(1, len(texts) + 1))
    return [{"doc_id": ids[i:i + size], "text": texts[i:i + size], "reason": [""] * len(texts[i:i + size]),
             "raw": [""] * len(texts[i:i + size])} for i in range(0, len(texts), size)]


_CLEAN = CleanConfig(min_words=5, max_symbol_word_ratio=0.5).model_dump()


@pytest.mark.parametrize("dedup", [DedupConfig(exact=True), DedupConfig(near=True),
                                   DedupConfig(exact=True, near=True, threshold=0.7, num_perm=64)])
def test_local_dedup_finds_what_all_pairs_find_in_any_blocks_and_partitions(tmp_path, dedup):
    texts = _corpus(random.Random(11))
    metas = [workers.scan_batch(b, _CLEAN, dedup.model_dump()) for b in _blocks(texts, 16)]
    good = np.concatenate([m["reason"] == "" for m in metas])
    ids = np.concatenate([m["doc_id"] for m in metas])[good]
    exact = np.concatenate([m["exact"] for m in metas])[good]
    sigs = np.concatenate([m["sig"] for m in metas])[good] if dedup.near else None
    everything = np.array([(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))])
    if not dedup.near:  # exact only: candidates are documents with the same key
        everything = everything[(exact[everything[:, 0]] == exact[everything[:, 1]]).all(axis=1)]
    expected = resolve(ids, exact, sigs, everything, dedup.threshold)
    assert expected and all(isinstance(d, Duplicate) for d in expected)
    for size, parts in ((16, 16), (5, 1), (1000, 3)):
        metas = [workers.scan_batch(b, _CLEAN, dedup.model_dump()) for b in _blocks(texts, size)]
        got = find_duplicates_local(iter(metas), dedup, tmp_path / f"spill-{size}", partitions=parts)
        assert got == expected


def test_filter_verdicts_give_the_same_batches_as_running_the_filters():
    texts = _corpus(random.Random(5)) + ["caf\u0065\u0301 " * 10, "#### ... " * 20, "x y"]
    dedup = DedupConfig(exact=True).model_dump()
    blocks = _blocks(texts, 10)
    metas = [workers.scan_batch(b, _CLEAN, dedup) for b in blocks]
    filtered = executors._filtered([workers.filtered_rows(m["doc_id"], m["reason"]) for m in metas])
    assert len(filtered) >= 3 and set(filtered[:, 1].tolist()) == {2, 3}  # min_words, max_symbol_word_ratio
    # as dedup would: duplicates are among the documents that passed every filter
    removed = np.sort(np.concatenate([m["doc_id"][m["reason"] == ""][1:3] for m in metas]))
    for b in blocks:
        plain = workers.kept_texts(b, _CLEAN, removed)
        fast = workers.kept_texts(b, _CLEAN, removed, filtered)
        assert plain["text"].tolist() == fast["text"].tolist()
        a, b2 = workers._classify(b, CleanConfig(**_CLEAN), removed, None), \
            workers._classify(b, CleanConfig(**_CLEAN), removed, filtered)
        assert a[0] == b2[0] and a[1] == b2[1] and (a[2] == b2[2]).all() and a[3] == b2[3] and a[4] == b2[4]
