"""CLIP's BPE tokenizer files, built from the merges list bundled with the package.

The released VD folders carry their own `tokenizer/`; this serves the folders
vd_jax writes itself (tests, the demo) without a model hub.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources

_MERGES_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48894 merges of the file (49152 - 256 - 2 tokens).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_clip_tokenizer_files(directory: str | os.PathLike) -> str:
    """Writes `vocab.json`, `merges.txt` and tokenizer configs of CLIP ViT-L/14 into `directory`."""
    raw = resources.files("vd_jax.assets").joinpath(_MERGES_RESOURCE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return os.fspath(directory)


def bundled_clip_tokenizer():
    """A new CLIPTokenizer of ViT-L/14's vocabulary bundled with vd_jax (its files are written
    to a temporary folder and gone once read: the tokenizer holds them in memory)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vd_jax_clip_tok_") as tmp:
        return load_clip_tokenizer(write_clip_tokenizer_files(tmp))


def load_clip_tokenizer(directory: str | os.PathLike):
    """transformers' CLIPTokenizer from a local folder (never the hub)."""
    from transformers import CLIPTokenizer

    names = ("vocab.json", "tokenizer.json")
    if not any(os.path.isfile(os.path.join(directory, n)) for n in names):
        raise FileNotFoundError(
            f"{directory}: no CLIP tokenizer here (neither {' nor '.join(names)})"
        )
    return CLIPTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
