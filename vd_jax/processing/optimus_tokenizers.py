"""The Optimus text VAE's tokenizers, from the vocabularies bundled with the package.

- Encoder: `BertTokenizer` over bert-base-cased's vocabulary, `do_lower_case=False`.
  VD's `optimus_vae_next.encode` nevertheless lower-cases every sentence with
  `.lower()` first; `encode_for_optimus` keeps that quirk by default.
- Decoder: `GPT2Tokenizer` over GPT-2's vocabulary and merges, plus three added
  special tokens `<PAD>`, `<BOS>`, `<EOS>` (ids 50257, 50258, 50259, in that
  order, as `optimus_vae.__init__` adds them).

See docs/original.md §4.4. Works with transformers 4.x (file-path
constructors) and 5.x (tokenizers-backed constructors taking the vocab itself).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

BERT_VOCAB = "bert-base-cased-vocab.txt"
GPT2_VOCAB = "gpt2-vocab.json"
GPT2_MERGES = "gpt2-merges.txt"

# Optimus' added decoder tokens, in the order (and so with the ids) the original adds them.
SPECIAL_TOKENS = {"pad_token": "<PAD>", "bos_token": "<BOS>", "eos_token": "<EOS>"}
PAD_ID, BOS_ID, EOS_ID = 50257, 50258, 50259
# The original truncates the BERT tokens of a sentence to this many before [CLS]/[SEP].
MAX_TOKENS = 77
# [CLS] + MAX_TOKENS pieces + [SEP]: the longest encoder input, so padding every batch to it
# gives one shape (what a jitted encode needs) without cutting any sentence.
ENCODER_LENGTH = MAX_TOKENS + 2


def _vocab_dir(directory: str | os.PathLike | None) -> Path:
    if directory is not None:
        return Path(directory)
    return Path(str(resources.files("vd_jax").joinpath("assets", "optimus_vocab")))


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def load_bert_tokenizer(directory: str | os.PathLike | None = None):
    """Optimus' encoder tokenizer (cased WordPiece, no lower-casing of its own).

    Args:
      directory: folder holding `bert-base-cased-vocab.txt`; None = the bundled copy.

    Returns:
      A transformers `BertTokenizer`.
    """
    from transformers import BertTokenizer

    path = _vocab_dir(directory) / BERT_VOCAB
    if _takes(BertTokenizer, "vocab_file"):  # transformers 4.x
        return BertTokenizer(vocab_file=str(path), do_lower_case=False)
    lines = path.read_text(encoding="utf-8").split("\n")
    vocab = {tok: i for i, tok in enumerate(lines) if tok}
    return BertTokenizer(vocab=vocab, do_lower_case=False)


def load_gpt2_tokenizer(directory: str | os.PathLike | None = None):
    """Optimus' decoder tokenizer: GPT-2's BPE plus `<PAD>`, `<BOS>`, `<EOS>`.

    Args:
      directory: folder holding `gpt2-vocab.json` and `gpt2-merges.txt`; None = the
        bundled copy.

    Returns:
      A transformers `GPT2Tokenizer` of 50260 tokens.

    Raises:
      ValueError: if the added tokens do not get the ids the released decoder uses.
    """
    from transformers import GPT2Tokenizer

    d = _vocab_dir(directory)
    if _takes(GPT2Tokenizer, "vocab_file"):  # transformers 4.x
        tok = GPT2Tokenizer(vocab_file=str(d / GPT2_VOCAB), merges_file=str(d / GPT2_MERGES))
    else:
        vocab = json.loads((d / GPT2_VOCAB).read_text(encoding="utf-8"))
        lines = (d / GPT2_MERGES).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
        tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens(dict(SPECIAL_TOKENS))
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS.values()))
    if list(ids) != [PAD_ID, BOS_ID, EOS_ID]:
        raise ValueError(f"Optimus special tokens got ids {ids}, expected 50257..50259")
    return tok


def encode_for_optimus(
    tokenizer,
    texts: str | Sequence[str],
    lowercase: bool = True,
    max_tokens: int = MAX_TOKENS,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder input ids as VD's `optimus_vae_next.encode` builds them.

    Args:
      tokenizer: from `load_bert_tokenizer`.
      texts: one sentence or a batch.
      lowercase: apply the original's `.lower()` (its vocabulary is cased, but the
        released pipeline lower-cases anyway; keep True to reproduce it).
      max_tokens: WordPiece tokens kept per sentence, before [CLS]/[SEP] are added.
      pad_to: pad to this length instead of the batch's longest (fixed jit shapes).

    Returns:
      (input_ids, attention_mask): int32 [B, L]; padding is id 0 and the mask is
      `ids > 0`, as in the original.
    """
    if isinstance(texts, str):
        texts = [texts]
    rows = []
    for text in texts:
        pieces = tokenizer.tokenize(text.lower() if lowercase else text)[:max_tokens]
        ids = tokenizer.convert_tokens_to_ids(pieces)
        rows.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    if any(len(r) > length for r in rows):
        raise ValueError(f"a sentence needs more than pad_to={pad_to} tokens")
    input_ids = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
    return input_ids, (input_ids > 0).astype(np.int32)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces=True` rule (spaces before punctuation
    and English contractions).

    Spelled out here because transformers 5 no longer applies it to BPE tokenizers,
    while the original decoder output went through it.
    """
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


def decode_tokens(tokenizer, ids, length: int | None = None) -> str | list[str]:
    """Text of generated decoder tokens, as the original's post-processing gives it.

    The original decodes `<BOS> ... <EOS>` with `clean_up_tokenization_spaces=True`
    and drops the first and last words (`split()[1:-1]`), i.e. the two special
    tokens; here the special ids are dropped instead and the text is stripped.

    Args:
      tokenizer: from `load_gpt2_tokenizer`.
      ids: [L] or [B, L] token ids; everything from the first `<EOS>` on is dropped.
      length: if given, only the first `length` ids count (for [L] input).

    Returns:
      A string for [L] input, a list of strings for [B, L].
    """
    ids = np.asarray(ids)
    if ids.ndim == 2:
        return [decode_tokens(tokenizer, row) for row in ids]
    ids = ids[:length] if length is not None else ids
    eos = np.flatnonzero(ids == EOS_ID)
    if eos.size:
        ids = ids[: eos[0]]
    ids = [int(i) for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)]
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return clean_up_tokenization(text).strip()
