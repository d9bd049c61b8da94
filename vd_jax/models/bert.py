"""BERT (transformers' `BertModel`) in Flax: the encoder half of VD's Optimus text VAE.

Optimus' `BertForLatentConnector` is a plain post-LN BERT-base (cased) whose
pooled [CLS] output goes through one extra bias-free `linear` (hidden ->
2 * latent) that is chunked into (mu, logvar); VD keeps only mu (see
docs/original.md §4.4).

Parameter names mirror transformers' modules, so conversion is a rename plus a
transpose (vd_jax/convert/optimus.py): `embeddings/{word,position,token_type}_
embeddings`, `embeddings/LayerNorm`, `encoder/layer_{i}/{attention/{self/{query,
key,value}, output/{dense,LayerNorm}}, intermediate/dense, output/{dense,
LayerNorm}}`, `pooler/dense` and Optimus' `linear`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax.models.attention import attention
from vd_jax.models.layers import (
    ACTIVATIONS,
    DtypesMixin,
    LayerNorm,
    activation,
    dense,
    pick_fields,
    qkv,
)

Dtype = Any


def latent_fields(
    cls: type, d: Mapping[str, Any], latent_size: int | None, hidden_field: str
) -> dict[str, Any]:
    """`pick_fields` of an Optimus half's config, with the latent width settled.

    Args:
      cls: the config dataclass; it has a `latent_size` field.
      d: the transformers config dict.
      latent_size: Optimus' latent width; overrides `d["latent_size"]`. With neither, the
        latent is as wide as the hidden state (as in Optimus).
      hidden_field: the name of `cls`'s hidden width field.

    Returns:
      The keyword arguments of `cls`.
    """
    kw = pick_fields(cls, d)
    if latent_size is not None:
        kw["latent_size"] = latent_size
    elif "latent_size" not in kw:
        kw["latent_size"] = kw.get(hidden_field, getattr(cls, hidden_field))
    return kw


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT sizes; the defaults are Optimus' bert-base-cased encoder (latent 768)."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    latent_size: int = 768

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], latent_size: int | None = None) -> BertConfig:
        """Reads a transformers `BertConfig` dict (`config.json`).

        Args:
          d: the config dict. Keys it lacks keep this class's defaults.
          latent_size: Optimus' latent width; overrides `d["latent_size"]`. With
            neither, the latent is as wide as the hidden state (as in Optimus).

        Returns:
          The config.
        """
        kw = latent_fields(cls, d, latent_size, "hidden_size")
        if kw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"unsupported BERT hidden_act {kw['hidden_act']!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict (with Optimus' `latent_size`); `from_hf` reads
        it back to this config."""
        return {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            **dataclasses.asdict(self),
        }


class _BertModule(DtypesMixin, nn.Module):
    """A part of BERT: its sizes, compute dtype and parameter storage dtype."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def part_kw(self) -> dict[str, Any]:
        """The keywords of a sub-part: this config and these dtypes."""
        return dict(config=self.config, **self.dtypes)


class BertEmbeddings(_BertModule):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg, kw = self.config, self.dtypes
        length = input_ids.shape[-1]
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **kw)
        pos = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", **kw
        )
        typ = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings", **kw)
        x = word(input_ids) + pos(jnp.arange(length))[None] + typ(token_type_ids)
        return LayerNorm(cfg.layer_norm_eps, name="LayerNorm", **kw)(x)


class _SelfAttention(_BertModule):
    """transformers' `BertSelfAttention`: biased query/key/value, scaled dot product."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c, kw = self.config.hidden_size, self.dtypes
        q, k, v = qkv(x, x, c, ("query", "key", "value"), **kw)
        return attention(q, k, v, self.config.num_attention_heads, mask)


class _DenseResidualNorm(_BertModule):
    """transformers' `Bert(Self)Output`: LayerNorm(dense(h) + residual)."""

    @nn.compact
    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        cfg, kw = self.config, self.dtypes
        h = dense(cfg.hidden_size, name="dense", **kw)(h)
        return LayerNorm(cfg.layer_norm_eps, name="LayerNorm", **kw)(h + residual)


class _Attention(_BertModule):
    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = _SelfAttention(name="self", **self.part_kw)(x, mask)
        return _DenseResidualNorm(name="output", **self.part_kw)(h, x)


class _Intermediate(_BertModule):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = dense(cfg.intermediate_size, name="dense", **self.dtypes)(x)
        return activation(cfg.hidden_act)(h)


class BertLayer(_BertModule):
    """Post-LN block: a = LN(x + attn(x)), then LN(a + ffn(a))."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        a = _Attention(name="attention", **self.part_kw)(x, mask)
        h = _Intermediate(name="intermediate", **self.part_kw)(a)
        return _DenseResidualNorm(name="output", **self.part_kw)(h, a)


class _Stack(_BertModule):
    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(name=f"layer_{i}", **self.part_kw)(x, mask)
        return x


class _Pooler(_BertModule):
    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.tanh(dense(self.config.hidden_size, name="dense", **self.dtypes)(h[:, 0]))


class BertEncoder(_BertModule):
    """transformers' `BertModel` plus Optimus' latent head (`BertForLatentConnector`).

    `__call__` is the plain `BertModel` (its params alone load a transformers
    checkpoint); `latent` adds the bias-free `linear` head, so initialise through
    `latent` to get Optimus' params.
    """

    def setup(self):
        self.embeddings = BertEmbeddings(**self.part_kw)
        self.encoder = _Stack(**self.part_kw)
        self.pooler = _Pooler(**self.part_kw)
        self.linear = dense(2 * self.config.latent_size, use_bias=False, **self.dtypes)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Runs BERT.

        Args:
          input_ids: [B, L] token ids, L <= max_position_embeddings.
          attention_mask: [B, L], nonzero = a real token; padding keys are masked
            out for every query (None: attend everywhere).
          token_type_ids: [B, L] segment ids (None: all 0).

        Returns:
          dict with `last_hidden_state` [B, L, H] and `pooler_output` [B, H]
          (tanh(dense(.)) of the [CLS] state).
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            mask = jnp.ones((b, 1, 1, length), dtype=bool)
        else:
            mask = (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        h = self.encoder(self.embeddings(input_ids, jnp.asarray(token_type_ids)), mask)
        return {"last_hidden_state": h, "pooler_output": self.pooler(h)}

    def latent(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Optimus' posterior parameters.

        Args:
          input_ids: [B, L] ids from `vd_jax.processing.optimus_tokenizers.encode_for_optimus`.
          attention_mask: [B, L]; None = `ids > 0`, the original's mask.

        Returns:
          (mu, logvar), each [B, latent_size]. VD's text latent is mu, unscaled.
        """
        if attention_mask is None:
            attention_mask = jnp.asarray(input_ids) > 0
        pooled = self(input_ids, attention_mask)["pooler_output"]
        mu, logvar = jnp.split(self.linear(pooled), 2, axis=-1)
        return mu, logvar
