"""Packed windows without cross-document attention: each document trains as if it were alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ModelConfig
from pipeline.models import build_model
from pipeline.models import attention_masks
from pipeline.models.attention_masks import build_mask, document_index, document_positions

pytestmark = pytest.mark.unit

SMALL = dict(n_layer=2, n_head=4, d_model=32, d_ff=48, max_seq_len=32, vocab_size=61, pad_vocab_to_multiple_of=8)
MODELS = {
    "gpt2": dict(arch="gpt"),
    "llama": dict(arch="gpt", position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2,
                  tie_embeddings=False),
    "bert": dict(arch="bert", layer_norm_eps=1e-12),
    "modernbert": dict(arch="bert", norm_placement="pre", position="rope", mlp="geglu", bias=False,
                       type_vocab_size=0, n_layer=3, local_attention_window=6, global_attention_every_n_layers=3),
}
LENGTHS = [[7, 10, 7], [3, 16, 5]]  # two packed rows of 24 tokens, three documents each


def model_for(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SMALL, **MODELS[name]}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def packed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2, 24) and doc_ids: the document's index in its row (any id that changes would do)."""
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(row)) for row in LENGTHS])
    return ids, doc_ids


def documents(row: int) -> list[slice]:
    starts = [0, *torch.tensor(LENGTHS[row]).cumsum(0).tolist()]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=6), min_size=1, max_size=3))
def test_positions_restart_at_zero_in_each_document(rows):
    width = max(sum(r) for r in rows)
    rows = [r + [width - sum(r)] if sum(r) < width else r for r in rows]  # fill each row to one width
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)) % 2, torch.tensor(r)) for r in rows])
    expected = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    # ids alternate 0, 1, 0, ...: a document is a run, not an id
    assert torch.equal(document_positions(doc_ids), expected)
    assert torch.equal(document_index(doc_ids).amax(dim=1), torch.tensor([len(r) - 1 for r in rows]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 4])
def test_the_mask_is_the_rule_checked_pair_by_pair(causal, window):
    _, doc_ids = packed_batch()
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[1, 20:] = False
    mask = build_mask(causal=causal, seq_len=24, device=torch.device("cpu"), doc_ids=doc_ids, padding=padding,
                      window=window).expand(2, 1, 24, 24)
    docs = document_index(doc_ids)
    for b in range(2):
        for q in range(24):
            for k in range(24):
                rule = bool(docs[b, q] == docs[b, k]) and bool(padding[b, k])
                rule &= (k <= q or not causal) and (window is None or abs(q - k) <= window // 2)
                assert bool(mask[b, 0, q, k]) == (rule or q == k), (b, q, k)


def test_without_documents_padding_or_window_there_is_no_mask():
    assert build_mask(causal=True, seq_len=8, device=torch.device("cpu")) is None  # the fused causal kernel


@pytest.mark.parametrize("name", sorted(MODELS))
def test_changing_a_token_of_one_document_never_changes_another_documents_logits(name):
    model = model_for(name)
    ids, doc_ids = packed_batch()
    with torch.no_grad():
        base = model(ids, doc_ids=doc_ids)
        for row in range(2):
            for changed_doc, span in enumerate(documents(row)):
                for t in (span.start, span.stop - 1):
                    changed = ids.clone()
                    changed[row, t] = (changed[row, t] + 1) % 61
                    out = model(changed, doc_ids=doc_ids)
                    others = doc_ids[row] != changed_doc
                    assert torch.equal(out[row, others], base[row, others]), (row, changed_doc, t)
                    assert not torch.allclose(out[row, span], base[row, span])
                    assert torch.equal(out[1 - row], base[1 - row])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_logits_are_each_documents_logits_alone(name):
    model = model_for(name)
    ids, doc_ids = packed_batch()
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        for row in range(2):
            for span in documents(row):
                alone = model(ids[row:row + 1, span])  # (1, n, V), positions 0..n-1
                torch.testing.assert_close(packed[row:row + 1, span], alone, atol=1e-5, rtol=0)


def labels_for(name: str, ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """GPT: the next token of the same document (-100 at a document's last token); BERT: a few
    masked positions per document."""
    if MODELS[name]["arch"] == "gpt":
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        last = torch.ones_like(doc_ids, dtype=torch.bool)
        last[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
        return labels.masked_fill(last, -100)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    picked[:, [0, 7, 17, 3, 19]] = True  # at least one masked token in every document
    return torch.where(picked, (ids * 7 + 3) % 61, labels)


def loss_packed_and_alone(model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed batch's loss, and the mean of every document's loss computed alone, weighted by
    its number of predicted tokens (the same mean over the same tokens)."""
    ids, doc_ids = packed_batch()
    labels = labels_for(name, ids, doc_ids)
    packed = model(ids, labels, doc_ids=doc_ids)
    total, count = 0.0, 0
    for row in range(2):
        for span in documents(row):
            n = int((labels[row, span] != -100).sum())
            total = total + model(ids[row:row + 1, span], labels[row:row + 1, span]) * n
            count += n
    return packed, total / count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_loss_is_the_token_weighted_mean_of_each_documents_loss_alone(name):
    model = model_for(name)
    with torch.no_grad():
        packed, alone = loss_packed_and_alone(model, name)
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_of_packed_and_unpacked_documents_agree(name):
    grads = []
    for packed_side in (True, False):
        model = model_for(name)
        packed, alone = loss_packed_and_alone(model, name)
        (packed if packed_side else alone).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=0, msg=n)


def test_bert_packs_segments_before_a_padding_tail():
    model = model_for("modernbert")
    ids, doc_ids = packed_batch()
    padding = torch.ones_like(ids)
    padding[1, 19:] = 0  # row 1: segments of 3 and 16 tokens, then 5 pad tokens (their own "document")
    with torch.no_grad():
        packed = model(ids, attention_mask=padding, doc_ids=doc_ids)
        for span in documents(1)[:2]:
            torch.testing.assert_close(packed[1:, span], model(ids[1:, span]), atol=1e-5, rtol=0)
    assert torch.isfinite(packed).all()


def flex_and_sdpa_logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    sdpa = model_for(name)
    flex = build_model(sdpa.cfg.model_copy(update={"attention_kernel": "flex"})).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids, doc_ids = packed_batch()
    with torch.no_grad():
        return flex(ids, doc_ids=doc_ids), sdpa(ids, doc_ids=doc_ids)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", ["llama", "modernbert"])
def test_flex_block_masks_encode_the_same_rule_as_the_sdpa_masks(name, monkeypatch):
    """attention_kernel: flex with the uncompiled kernel (same numerics, no compile time)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(attention_masks, "_compiled_flex", lambda: flex_attention)
    flex, sdpa = flex_and_sdpa_logits(name)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "modernbert"])
def test_compiled_flex_attention_gives_the_sdpa_logits(name):
    """The kernel CUDA runs, compiled here for the CPU (about 15 s each)."""
    flex, sdpa = flex_and_sdpa_logits(name)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)
