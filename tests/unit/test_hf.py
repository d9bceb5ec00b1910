"""Export to / import from transformers: same logits, bit-identical round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForMaskedLM, GPT2LMHeadModel

from pipeline.config import ModelConfig
from pipeline.models import build_model, load_state_dict_tied, state_dict_for_save
from pipeline.models.hf import export_to_hf, import_from_hf

pytestmark = pytest.mark.unit

HF_CLASS = {"gpt": GPT2LMHeadModel, "bert": BertForMaskedLM}


def random_model(arch: str, **overrides) -> tuple[ModelConfig, torch.nn.Module]:
    """A tiny model whose every tensor (biases and norms too) is random, so no mapping hides."""
    eps = 1e-12 if arch == "bert" else 1e-5
    fields = dict(arch=arch, n_layer=2, n_head=4, d_model=32, d_ff=48, max_seq_len=24, vocab_size=61,
                  pad_vocab_to_multiple_of=8, layer_norm_eps=eps)
    cfg = ModelConfig(**{**fields, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases become non-zero, norm gains ≠ 1
    return cfg, model


def load_hf(arch: str, path) -> torch.nn.Module:
    hf, info = HF_CLASS[arch].from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return hf.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_exported_gpt_gives_our_logits_in_transformers(tie, tmp_path):
    cfg, model = random_model("gpt", tie_embeddings=tie)
    export_to_hf(model.state_dict(), cfg, tmp_path)
    hf = load_hf("gpt", tmp_path)
    ids = torch.randint(0, 61, (3, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_exported_bert_gives_our_logits_in_transformers_with_padding(tie, tmp_path):
    cfg, model = random_model("bert", tie_embeddings=tie)
    export_to_hf(state_dict_for_save(model), cfg, tmp_path)
    hf = load_hf("bert", tmp_path)
    ids = torch.randint(0, 61, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:], mask[2, 5:] = 0, 0
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("tie", [True, False])
def test_import_then_export_is_bit_identical(arch, tie, tmp_path):
    cfg, model = random_model(arch, tie_embeddings=tie)
    export_to_hf(model.state_dict(), cfg, tmp_path / "a")
    cfg_back, sd = import_from_hf(tmp_path / "a")
    export_to_hf(sd, cfg_back, tmp_path / "b")
    first = load_file(tmp_path / "a" / "model.safetensors")
    second = load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype and torch.equal(tensor, second[name]), name
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (tmp_path / "b" / "config.json").read_text()
    )
    # ...and the imported weights are exactly ours
    rebuilt = build_model(cfg_back)
    load_state_dict_tied(rebuilt, sd)
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_import_reads_a_checkpoint_saved_by_transformers(arch, tmp_path):
    cfg, model = random_model(arch)
    export_to_hf(model.state_dict(), cfg, tmp_path / "ours")
    hf = load_hf(arch, tmp_path / "ours")
    hf.save_pretrained(tmp_path / "saved")  # transformers' own file layout and config.json
    cfg_back, sd = import_from_hf(tmp_path / "saved")
    rebuilt = build_model(cfg_back).eval()
    load_state_dict_tied(rebuilt, sd)
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_export_copies_a_tokenizer_that_transformers_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    cfg, model = random_model("gpt")
    export_to_hf(model.state_dict(), cfg, tmp_path / "out", tokenizer_json=tmp_path / "tok.json")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded("hello world")["input_ids"] == [1, 2]


def test_import_refuses_an_unsupported_variant_naming_the_key(tmp_path):
    cfg, model = random_model("bert")
    export_to_hf(model.state_dict(), cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="position_embedding_type"):
        import_from_hf(tmp_path)


def test_import_never_unpickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1,
                                                       "n_embd": 8, "n_positions": 8, "vocab_size": 8}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="no model.safetensors"):
        import_from_hf(tmp_path)
