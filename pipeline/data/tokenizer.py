"""Tokenizers, trained with HF `tokenizers` and saved as a portable tokenizer.json.

- ``bpe``: byte-level BPE (GPT-2 style), one special token: end-of-document.
- ``wordpiece``: lower-cased WordPiece (BERT style), with [PAD] [UNK] [CLS] [SEP] [MASK].
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pipeline.config import TokenizerConfig
from pipeline.errors import UserError
from pipeline.objstore import is_uri
from pipeline.remote_inputs import local_copy

BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


class TokenizerError(UserError):
    """A tokenizer that lacks what the config or the model needs."""


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    if cfg.type == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=BERT_SPECIALS["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        specials = list(BERT_SPECIALS.values())
        if cfg.eod not in specials:
            specials.append(cfg.eod)
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[cfg.eod],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """The local file of ``data.tokenizer.path``: itself, or for a URI (``s3://…/tokenizer.json``) its
    verified copy in this node's cache (pipeline/remote_inputs.py)."""
    if is_uri(path):
        return local_copy(str(path), "data.tokenizer.path")
    return Path(path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = tokenizer_file(path)
    if not path.is_file():
        raise TokenizerError(f"data.tokenizer.path: no such file: {path}")
    return Tokenizer.from_file(str(path))


def special_ids(tok: Tokenizer, cfg: TokenizerConfig) -> dict[str, int]:
    """Ids of the special tokens the pipeline uses: always ``eod``; for wordpiece the BERT ones."""
    wanted = {"eod": cfg.eod}
    if cfg.type == "wordpiece":
        wanted.update(BERT_SPECIALS)
    out = {}
    for role, token in wanted.items():
        idx = tok.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"tokenizer has no {token!r} token (needed as {role}); check data.tokenizer")
        out[role] = idx
    return out
