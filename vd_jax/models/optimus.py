"""VD's Optimus text VAE: a BERT encoder (text -> mu) and a latent-conditioned GPT-2 decoder.

The two halves live in vd_jax/models/bert.py and vd_jax/models/gpt2.py; this
module gathers them with the config reader for the layout VD's `optimus.yaml`
uses (`{"bert": {...}, "gpt2": {...}, "latent_size": N}`), and `OptimusVAE`, the
one object that turns sentences into latents and back for the pipelines and the
trainer. Decoding lives in vd_jax/models/text_decoding.py, tokenizers in
vd_jax/processing/optimus_tokenizers.py and the `optimus-vae.pth` key table in
vd_jax/convert/optimus.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.models.bert import BertConfig, BertEncoder
from vd_jax.models.gpt2 import Cache, GPT2Config, GPT2Decoder

__all__ = [
    "BertConfig",
    "BertEncoder",
    "Cache",
    "GPT2Config",
    "GPT2Decoder",
    "OptimusVAE",
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


@dataclasses.dataclass
class OptimusVAE:
    """Optimus as one object: sentences -> latents (the encoder's mu) and latents -> sentences.

    Shared by `VDPipeline` (image->text, text variation, I2T2I) and the trainer's frozen
    encoders (text flows trained from raw captions).

    Attributes:
      configs: (BertConfig, GPT2Config), e.g. from `optimus_configs`.
      params: {"encoder": ..., "decoder": ...}; a half the caller does not use may be absent.
      bert_tokenizer / gpt2_tokenizer: from `vd_jax.processing.optimus_tokenizers`.
      lowercase: the original lower-cases text before its cased BERT.
      dtype: compute dtype.
    """

    configs: tuple[BertConfig, GPT2Config]
    params: Mapping[str, Any]
    bert_tokenizer: Any = None
    gpt2_tokenizer: Any = None
    lowercase: bool = True
    dtype: Any = jnp.float32

    def _half(self, name: str) -> Any:
        p = (self.params or {}).get(name)
        if p is None:
            raise ValueError(f"this Optimus VAE was loaded without its {name}")
        return p

    @property
    def encoder_params(self) -> Any:
        """The encoder half's params (BERT and its latent head)."""
        return self._half("encoder")

    def tokenize(
        self, texts: Sequence[str], pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encoder (input_ids, attention_mask), int32 [B, L], as the original builds them.

        Args:
          texts: sentences.
          pad_to: pad to this length (`optimus_tokenizers.ENCODER_LENGTH` fits every
            sentence) instead of the batch's longest, for one compiled shape.
        """
        from vd_jax.processing.optimus_tokenizers import encode_for_optimus

        return encode_for_optimus(
            self.bert_tokenizer, list(texts), lowercase=self.lowercase, pad_to=pad_to
        )

    def latents(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Latents (the encoder's mu) [B, latent] of tokenized sentences (`tokenize`).

        Pure in its arguments, so it traces: the trainer calls it inside its jitted step with
        its own (sharded) copy of `encoder_params`.
        """
        enc = BertEncoder(self.configs[0], dtype=self.dtype)
        mu, _ = enc.apply({"params": params}, ids, mask, method="latent")
        return mu

    def encode(self, texts: Sequence[str]) -> jax.Array:
        """Latents (the encoder's mu) [B, latent] of sentences."""
        return self.latents(self.encoder_params, *self.tokenize(texts))

    def decode(
        self,
        latents: jax.Array,
        *,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_length: int = 30,
        method: str = "sample",
        num_beams: int = 4,
        remove_duplicates: bool = True,
    ) -> list[str]:
        """Sentences from latents (the original: ancestral sampling, T=1, 30 tokens)."""
        from vd_jax.models import text_decoding as td
        from vd_jax.processing.optimus_tokenizers import BOS_ID, EOS_ID

        params = self._half("decoder")
        dec = GPT2Decoder(self.configs[1], dtype=self.dtype)
        z = jnp.asarray(latents, jnp.float32)
        kw = dict(bos_id=BOS_ID, eos_id=EOS_ID, max_length=max_length)
        if method == "sample":
            rng = jax.random.fold_in(jax.random.key(seed), 2)
            out = td.sample(
                dec, params, z, rng, temperature=temperature, top_k=top_k, top_p=top_p, **kw
            )
        elif method == "greedy":
            out = td.greedy(dec, params, z, **kw)
        elif method == "beam":
            out = td.beam_search(dec, params, z, num_beams=num_beams, **kw)
        else:
            raise ValueError(f"text decoding method {method!r}: sample | greedy | beam")
        return td.decode_texts(self.gpt2_tokenizer, out, remove_duplicates=remove_duplicates)


def fold_latent_scale(params: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """Optimus params whose latents are `scale` x those of `params`, as plain Optimus weights.

    A model whose diffuser reads Optimus means x `scale` (the demo's, `scale` = 1 / their std)
    becomes one that reads the means as they are, as VD's released model does: the mu half of
    the encoder's latent head is multiplied by `scale`, the decoder's latent projections
    (`linear`, `linear_emb`, both bias-free and linear in z) divided by it. The encoder's logvar
    half, which VD never reads, is left as it is.
    """
    out = jax.tree_util.tree_map(np.asarray, dict(params))
    if "encoder" in out:
        enc = dict(out["encoder"])
        kernel = np.array(enc["linear"]["kernel"])
        latent = kernel.shape[-1] // 2
        kernel[..., :latent] *= scale
        enc["linear"] = {**enc["linear"], "kernel": kernel}
        out["encoder"] = enc
    if "decoder" in out:
        dec = dict(out["decoder"])
        for name in ("linear", "linear_emb"):
            dec[name] = {**dec[name], "kernel": np.asarray(dec[name]["kernel"]) / scale}
        out["decoder"] = dec
    return out
