"""Data blocks of VD's text diffuser (the "0-D U-Net" over Optimus latents).

The torch original keeps the text hidden state as a [B, C, S, 1] map (S = 4, the
"second dim") and its FC blocks, "down"/"up" samplers and output layer flatten
it channel-major (index c*S + s) before dense layers that mix all S positions.
Here the state is kept as S tokens, [B, S, C], so the shared `SpatialTransformer`
sees S tokens exactly like the torch one sees the 4x1 map; every dense layer
converts to the channel-major flat vector first, so torch weights load with a
plain transpose and no permutation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax.models.layers import Dtype, NormActBlock, dense


def tokens_to_flat(h: jax.Array) -> jax.Array:
    """[B, S, C] tokens -> [B, C*S] in torch's channel-major order (index c*S + s)."""
    return jnp.swapaxes(h, 1, 2).reshape(h.shape[0], -1)


def flat_to_tokens(v: jax.Array, second_dim: int) -> jax.Array:
    """Inverse of `tokens_to_flat`: [B, C*S] -> [B, S, C]."""
    return jnp.swapaxes(v.reshape(v.shape[0], -1, second_dim), 1, 2)


class TextIn(nn.Module):
    """Block 0: Linear(text_dim -> C*S), viewed as a [C, S] map (projected, not reshaped)."""

    out_channels: int
    second_dim: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        v = dense(
            self.out_channels * self.second_dim,
            name="linear",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        return flat_to_tokens(v, self.second_dim)


class FCResBlock(NormActBlock):
    """VD's `FCBlock_MultiDim` / diffusers' `ResnetBlockFlat` on [B, S, C] tokens.

    A dense residual MLP over the flattened C*S vector: GN(groups, C*S) - SiLU -
    dense, + time embedding, GN - SiLU - dense, dense skip when the width changes.
    GroupNorm over the flat vector groups C/groups channels x all S positions and
    has a per-(c, s) affine, which is why it cannot be a GroupNorm over tokens.
    """

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        kw = self.dtypes
        s = x.shape[1]
        width = self.out_channels * s
        v = tokens_to_flat(x)
        h = self.norm_silu(v, "norm1")
        h = dense(width, name="conv1", **kw)(h)
        h = h + dense(width, name="time_emb_proj", **kw)(nn.silu(temb))
        h = self.norm_silu(h, "norm2")
        h = dense(width, name="conv2", **kw)(h)
        if v.shape[-1] != width:
            v = dense(width, name="conv_shortcut", **kw)(v)
        return flat_to_tokens(v + h, s)


class TextResample(nn.Module):
    """The text "down"/"up" sampler: a square Linear(C*S, C*S); the token count never changes."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        v = tokens_to_flat(x)
        v = dense(v.shape[-1], name="linear", dtype=self.dtype, param_dtype=self.param_dtype)(v)
        return flat_to_tokens(v, x.shape[1])


class TextOut(NormActBlock):
    """GroupNorm over the [C, S] map (per-channel affine) - SiLU - Linear(C*S -> out_channels).

    `out_channels` is the width of the text latent (the diffuser's `text_dim`).
    """

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        # Unlike the FC blocks' norms this one is a GroupNorm over channels of the map:
        # statistics span C/groups channels x S tokens, the affine is per channel.
        h = self.norm_silu(x, "norm")
        return dense(self.out_channels, name="linear", **self.dtypes)(tokens_to_flat(h))
