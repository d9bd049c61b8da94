"""GPT-2 with Optimus' latent connector (`GPT2ForLatentConnector`) in Flax, KV-cached.

Optimus conditions a GPT-2-small decoder on the text latent z in two ways
(docs/original.md §4.4), both on by default in VD:

1. embedding addition: `linear_emb(z)` (bias-free) is added to every token's
   wte + wpe embedding;
2. memory: `linear(z)` (bias-free, latent -> n_embd * n_layer) is split into one
   n_embd vector per layer; that vector is used *directly* (no c_attn
   projection) as both the key and the value of one extra leading attention
   position, split into heads like any other key/value. Every query may attend
   to it, and the real tokens are causal among themselves. Because the memory
   counts as one past position, token i sits at position id i + 1.

With `z=None` the decoder is exactly transformers' `GPT2LMHeadModel` (positions
from 0, no memory), which is what the parity tests exercise.

Positions are kept as *slots*: with memory, slot 0 is the latent and token i is
slot i + 1; without, token i is slot i. The position id of a token is its slot,
and a query may attend to every key whose slot is not after its own. The KV
cache is a fixed-size buffer indexed by slot, so decoding runs inside
`lax.while_loop` (see vd_jax/text_decoding.py).

Parameter names mirror transformers (`wte`, `wpe`, `h_{i}/{ln_1, attn/{c_attn,
c_proj}, ln_2, mlp/{c_fc, c_proj}}`, `ln_f`) plus Optimus' `linear` and
`linear_emb`; `lm_head` is tied to `wte` and has no param of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax.models.attention import attention
from vd_jax.models.bert import latent_fields
from vd_jax.models.layers import MLP, LayerNorm, activation, dense

Dtype = Any
# {"k": per-layer [B, S, C], "v": per-layer [B, S, C], "emb": [B, C], "index": int32 []}.
Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 sizes; the defaults are Optimus' GPT-2-small decoder (vocab 50257 + 3 added)."""

    vocab_size: int = 50260
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    latent_size: int = 768

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], latent_size: int | None = None) -> GPT2Config:
        """Reads a transformers `GPT2Config` dict (`config.json`), as `BertConfig.from_hf` does.

        Args:
          d: the config dict. Keys it lacks keep this class's defaults.
          latent_size: overrides `d["latent_size"]`; with neither, the latent is n_embd wide.

        Returns:
          The config.
        """
        kw = latent_fields(cls, d, latent_size, "n_embd")
        activation(kw.get("activation_function", cls.activation_function))  # fail early
        for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if d.get(flag, ok) != ok:
                raise ValueError(f"GPT-2 configs with {flag}={d[flag]} are not supported")
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict (with Optimus' `latent_size`); `from_hf` reads
        it back to this config."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            **dataclasses.asdict(self),
        }


class _Attention(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, past, cache_index):
        c = self.config.n_embd
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # GPT-2's Conv1D stores [in, out]: a dense kernel as is.
        q, k, v = jnp.split(dense(3 * c, name="c_attn", **kw)(x), 3, axis=-1)
        new = None
        if cache_index is None:
            if past is not None:  # the latent memory: [B, 1, C] keys and values
                k = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
                v = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        else:
            start = (0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(past[0], k.astype(past[0].dtype), start)
            v = jax.lax.dynamic_update_slice(past[1], v.astype(past[1].dtype), start)
            new = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), self.config.n_head, mask)
        return dense(c, name="c_proj", **kw)(out), new


class GPT2Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    `past` is either None, the latent memory (k, v) to prepend ([B, P, C] each),
    or, with `cache_index`, the layer's full cache buffers into which this
    call's keys/values are written at slot `cache_index`.
    """

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, past=None, cache_index=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_epsilon, name="ln_1", **kw)(x)
        h, new = _Attention(cfg, name="attn", **kw)(h, mask, past, cache_index)
        x = x + h
        h = LayerNorm(cfg.layer_norm_epsilon, name="ln_2", **kw)(x)
        act = activation(cfg.activation_function)
        mlp = MLP(cfg.inner_size, act, ("c_fc", "c_proj"), name="mlp", **kw)
        return x + mlp(h), new


def _causal_mask(query_slots: jax.Array, num_keys: int) -> jax.Array:
    """[1, 1, Lq, num_keys] booleans: key slot <= query slot."""
    return (jnp.arange(num_keys)[None, :] <= query_slots[:, None])[None, None]


class GPT2Decoder(nn.Module):
    """Optimus' `GPT2ForLatentConnector` (and, with z=None, transformers' `GPT2LMHeadModel`).

    Initialise with a z (`init(key, ids, z)`) to create `linear` / `linear_emb`;
    without one only the plain GPT-2 params exist.
    """

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, **kw)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, **kw)
        self.h = [GPT2Block(cfg, **kw) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, **kw)
        self.linear = dense(cfg.n_embd * cfg.n_layer, use_bias=False, **kw)
        self.linear_emb = dense(cfg.n_embd, use_bias=False, **kw)

    # ------------------------------------------------------------------ pieces

    def _latent(self, z: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The embedding offset [B, C] and the per-layer memory vectors [B, 1, C]."""
        cfg = self.config
        z = jnp.asarray(z).astype(self.dtype)
        mem = self.linear(z).reshape(z.shape[0], cfg.n_layer, 1, cfg.n_embd)
        return self.linear_emb(z), [mem[:, i] for i in range(cfg.n_layer)]

    def _embed(self, input_ids: jax.Array, slots: jax.Array, emb: jax.Array | None):
        x = self.wte(input_ids) + self.wpe(slots)[None]
        return x if emb is None else x + emb[:, None, :].astype(x.dtype)

    def _logits(self, x: jax.Array) -> jax.Array:
        # lm_head is tied to wte (no bias); logits come back in float32 for sampling.
        return self.wte.attend(self.ln_f(x)).astype(jnp.float32)

    def _check_length(self, num_slots: int):
        if num_slots > self.config.n_positions:
            raise ValueError(
                f"{num_slots} positions (latent slot included) exceed "
                f"n_positions={self.config.n_positions}"
            )

    # ------------------------------------------------------------------ API

    def __call__(self, input_ids: jax.Array, z: jax.Array | None = None) -> jax.Array:
        """Uncached forward pass over a whole sequence.

        Args:
          input_ids: [B, L] token ids (Optimus: starting with `<BOS>`).
          z: [B, latent_size] text latent, or None for plain GPT-2.

        Returns:
          [B, L, vocab] float32 next-token logits.
        """
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        length = input_ids.shape[1]
        offset = 0 if z is None else 1
        self._check_length(offset + length)
        emb, mem = (None, [None] * self.config.n_layer) if z is None else self._latent(z)
        slots = offset + jnp.arange(length)
        mask = _causal_mask(slots, offset + length)
        x = self._embed(input_ids, slots, emb)
        for block, m in zip(self.h, mem, strict=True):
            x, _ = block(x, mask, None if m is None else (m, m))
        return self._logits(x)

    def prefill(
        self, input_ids: jax.Array, z: jax.Array | None = None, *, max_new_tokens: int
    ) -> tuple[jax.Array, Cache]:
        """Runs a prefix and returns a cache with room for `max_new_tokens` more tokens.

        Args:
          input_ids: [B, L] prefix (Optimus: the `<BOS>` token alone).
          z: [B, latent_size] text latent, or None for plain GPT-2.
          max_new_tokens: how many tokens `step` may add afterwards (static).

        Returns:
          ([B, L, vocab] float32 logits, cache).
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        b, length = input_ids.shape
        offset = 0 if z is None else 1
        size = offset + length + max_new_tokens
        self._check_length(size)
        buf = jnp.zeros((b, size, cfg.n_embd), self.dtype)
        if z is None:
            emb, ks = jnp.zeros((b, cfg.n_embd), self.dtype), [buf] * cfg.n_layer
        else:
            emb, mem = self._latent(z)
            # The memory vector is both key and value of slot 0.
            ks = [buf.at[:, :1].set(m.astype(self.dtype)) for m in mem]
        cache = {"k": tuple(ks), "v": tuple(ks), "emb": emb, "index": jnp.int32(offset)}
        return self._run_cached(input_ids, cache)

    def step(self, token: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feeds one new token per sequence through the cache.

        Args:
          token: [B] token ids.
          cache: from `prefill` or a previous `step` (must have room left).

        Returns:
          ([B, vocab] float32 logits for the following token, updated cache).
        """
        logits, cache = self._run_cached(jnp.asarray(token).astype(jnp.int32)[:, None], cache)
        return logits[:, 0], cache

    def _run_cached(self, input_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        start = cache["index"]
        size = cache["k"][0].shape[1]
        slots = start + jnp.arange(input_ids.shape[1])
        mask = _causal_mask(slots, size)
        x = self._embed(input_ids, slots, cache["emb"])
        ks, vs = [], []
        for block, k, v in zip(self.h, cache["k"], cache["v"], strict=True):
            x, (k, v) = block(x, mask, (k, v), start)
            ks.append(k)
            vs.append(v)
        new = {"k": tuple(ks), "v": tuple(vs), "emb": cache["emb"], "index": slots[-1] + 1}
        return self._logits(x), new
