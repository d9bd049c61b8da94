"""BERT (transformers' `BertModel`) in Flax: the encoder half of VD's Optimus text VAE.

Optimus' `BertForLatentConnector` is a plain post-LN BERT-base (cased) whose
pooled [CLS] output goes through one extra bias-free `linear` (hidden ->
2 * latent) that is chunked into (mu, logvar); VD keeps only mu (see
shared/research/vd_original.md §4.4).

Parameter names mirror transformers' modules, so conversion is a rename plus a
transpose (vd_jax/convert/optimus.py): `embeddings/{word,position,token_type}_
embeddings`, `embeddings/LayerNorm`, `encoder/layer_{i}/{attention/{self/{query,
key,value}, output/{dense,LayerNorm}}, intermediate/dense, output/{dense,
LayerNorm}}`, `pooler/dense` and Optimus' `linear`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax.nn.attention import attention
from vd_jax.nn.layers import LayerNorm, dense

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # transformers' "gelu" is torch's exact erf form; the "new"/tanh names approximate it.
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The transformers activation called `name` (`hidden_act` / `activation_function`)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (known: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def pick_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `d` that name fields of the dataclass `cls` (None values dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


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
        kw = pick_fields(cls, d)
        if latent_size is not None:
            kw["latent_size"] = latent_size
        elif "latent_size" not in kw:
            kw["latent_size"] = kw.get("hidden_size", cls.hidden_size)
        if kw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"unsupported BERT hidden_act {kw['hidden_act']!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(**kw)


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[-1]
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **kw)
        pos = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", **kw
        )
        typ = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings", **kw)
        x = word(input_ids) + pos(jnp.arange(length))[None] + typ(token_type_ids)
        return LayerNorm(cfg.layer_norm_eps, name="LayerNorm", **kw)(x)


class _SelfAttention(nn.Module):
    """transformers' `BertSelfAttention`: biased query/key/value, scaled dot product."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(c, name="query", **kw)(x)
        k = dense(c, name="key", **kw)(x)
        v = dense(c, name="value", **kw)(x)
        return attention(q, k, v, self.config.num_attention_heads, mask)


class _DenseResidualNorm(nn.Module):
    """transformers' `Bert(Self)Output`: LayerNorm(dense(h) + residual)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(cfg.hidden_size, name="dense", **kw)(h)
        return LayerNorm(cfg.layer_norm_eps, name="LayerNorm", **kw)(h + residual)


class _Attention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        h = _SelfAttention(name="self", **kw)(x, mask)
        return _DenseResidualNorm(name="output", **kw)(h, x)


class _Intermediate(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return activation(cfg.hidden_act)(dense(cfg.intermediate_size, name="dense", **kw)(x))


class BertLayer(nn.Module):
    """Post-LN block: a = LN(x + attn(x)), then LN(a + ffn(a))."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        a = _Attention(name="attention", **kw)(x, mask)
        h = _Intermediate(name="intermediate", **kw)(a)
        return _DenseResidualNorm(name="output", **kw)(h, a)


class _Stack(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(name=f"layer_{i}", **kw)(x, mask)
        return x


class _Pooler(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return jnp.tanh(dense(self.config.hidden_size, name="dense", **kw)(h[:, 0]))


class BertEncoder(nn.Module):
    """transformers' `BertModel` plus Optimus' latent head (`BertForLatentConnector`).

    `__call__` is the plain `BertModel` (its params alone load a transformers
    checkpoint); `latent` adds the bias-free `linear` head, so initialise through
    `latent` to get Optimus' params.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = BertEmbeddings(cfg, **kw)
        self.encoder = _Stack(cfg, **kw)
        self.pooler = _Pooler(cfg, **kw)
        self.linear = dense(2 * cfg.latent_size, use_bias=False, **kw)

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
          input_ids: [B, L] ids from `vd_jax.optimus_tokenizers.encode_for_optimus`.
          attention_mask: [B, L]; None = `ids > 0`, the original's mask.

        Returns:
          (mu, logvar), each [B, latent_size]. VD's text latent is mu, unscaled.
        """
        if attention_mask is None:
            attention_mask = jnp.asarray(input_ids) > 0
        pooled = self(input_ids, attention_mask)["pooler_output"]
        mu, logvar = jnp.split(self.linear(pooled), 2, axis=-1)
        return mu, logvar
