"""VD's Optimus text VAE: a BERT encoder (text -> mu) and a latent-conditioned GPT-2 decoder.

The two halves live in vd_jax/models/bert.py and vd_jax/models/gpt2.py; this
module gathers them with the config reader for the layout VD's `optimus.yaml`
uses (`{"bert": {...}, "gpt2": {...}, "latent_size": N}`, as in the shared
fixtures' tiny_config.json "vae.text" entry). Decoding lives in
vd_jax/text_decoding.py, tokenizers in vd_jax/optimus_tokenizers.py and the
`optimus-vae.pth` key table in vd_jax/convert/optimus.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vd_jax.models.bert import BertConfig, BertEncoder
from vd_jax.models.gpt2 import Cache, GPT2Config, GPT2Decoder

__all__ = [
    "BertConfig",
    "BertEncoder",
    "Cache",
    "GPT2Config",
    "GPT2Decoder",
    "optimus_configs",
]


def optimus_configs(d: Mapping[str, Any] | None = None) -> tuple[BertConfig, GPT2Config]:
    """Encoder and decoder configs of an Optimus VAE.

    Args:
      d: `{"bert": <BertConfig dict>, "gpt2": <GPT2Config dict>, "latent_size": N}`;
        None gives the released model's sizes (bert-base-cased, GPT-2 small,
        vocab 50260, latent 768).

    Returns:
      (BertConfig, GPT2Config) sharing one latent size.
    """
    if d is None:
        return BertConfig(), GPT2Config()
    latent = d.get("latent_size")
    return (
        BertConfig.from_hf(d.get("bert", {}), latent_size=latent),
        GPT2Config.from_hf(d.get("gpt2", {}), latent_size=latent),
    )
