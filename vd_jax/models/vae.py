"""The image VAE: Stable Diffusion's kl-f8 `AutoencoderKL`, as VD uses it.

Numerically the same network as diffusers' `AutoencoderKL` (and LDM's
`ldm.models.autoencoder.AutoencoderKL`), channels-last. Parameter names follow
diffusers (`encoder/down_blocks_0/resnets_1/conv2`), so `vd_jax.convert.vae`
maps both the diffusers and the original LDM checkpoint layouts onto it.

Details that matter for parity with diffusers:
- every GroupNorm in the VAE uses eps 1e-6 (not torch's default 1e-5);
- the encoder's downsamplers pad (0, 1) on the bottom/right, then convolve
  with stride 2 and no padding;
- the decoder's up blocks run from the deepest level up, i.e. in reversed
  `block_out_channels` order, and hold `layers_per_block + 1` resnets;
- the mid-block attention is a single head over all H*W positions with head
  width C (scale C**-0.5), biased projections and a residual connection;
- the encoder's log-variance is clamped to [-30, 20] as diffusers'
  `DiagonalGaussianDistribution` does.
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
    Downsample2D,
    DtypesMixin,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    dense,
    qkv,
)

Dtype = Any

_EPS = 1e-6  # the VAE's GroupNorm epsilon everywhere (diffusers' resnet_eps and conv_norm_out)
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of an `AutoencoderKL` (defaults: SD / VD kl-f8)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    # Subtracted before scaling (SD3/Flux VAEs); None, i.e. 0, for SD's and VD's.
    shift_factor: float | None = None
    sample_size: int | tuple[int, ...] = 256
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels}: {c} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for kl-f8)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Reads a diffusers `vae/config.json` dict.

        Args:
          d: the parsed config.json of a diffusers `AutoencoderKL`.

        Returns:
          The matching config.

        Raises:
          ValueError: naming the field, for settings this port does not implement.
        """
        cls_name = d.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"_class_name: expected 'AutoencoderKL', got {cls_name!r}")
        block_out = tuple(d.get("block_out_channels", (64,)))
        for field, want in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = tuple(d.get(field, (want,)))
            if any(t != want for t in types):
                raise ValueError(f"{field}: only {want!r} blocks are supported, got {list(types)}")
            # diffusers sizes the blocks by block_out_channels but iterates the type list:
            # unequal lengths build a broken model there, so refuse them here.
            if len(types) != len(block_out):
                raise ValueError(
                    f"{field}: {len(types)} entries but block_out_channels has {len(block_out)}"
                )
        if d.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"act_fn: only 'silu' is supported, got {d['act_fn']!r}")
        if d.get("norm_type", "group") != "group":
            raise ValueError(f"norm_type: only 'group' is supported, got {d['norm_type']!r}")
        for field in ("latents_mean", "latents_std"):
            # Pipelines that set these normalise latents per channel; the helpers here would
            # silently produce latents on another scale, so refuse rather than guess.
            if d.get(field) is not None:
                raise ValueError(f"{field}: per-channel latent statistics are not supported")
        return cls(
            in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            latent_channels=int(d.get("latent_channels", 4)),
            block_out_channels=block_out,
            layers_per_block=int(d.get("layers_per_block", 1)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=None if d.get("shift_factor") is None else float(d["shift_factor"]),
            sample_size=d.get("sample_size", 32),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
        )

    @classmethod
    def from_ldm(
        cls, ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float = 0.18215
    ) -> VAEConfig:
        """Reads an original LDM/VD `AutoencoderKL` config (`ddconfig` plus `embed_dim`).

        Args:
          ddconfig: the `ddconfig` mapping (ch, ch_mult, num_res_blocks, z_channels, ...).
          embed_dim: the autoencoder's `embed_dim` (latent channels).
          scaling_factor: latent scale; LDM keeps it in the diffusion model's config.

        Returns:
          The matching config.

        Raises:
          ValueError: naming the field, for settings diffusers' layout cannot express.
        """
        if not ddconfig.get("double_z", True):
            raise ValueError("double_z: only True (a Gaussian posterior) is supported")
        if list(ddconfig.get("attn_resolutions", [])):
            raise ValueError("attn_resolutions: attention outside the mid blocks is not supported")
        if int(ddconfig["z_channels"]) != int(embed_dim):
            raise ValueError(
                f"embed_dim: {embed_dim} != z_channels {ddconfig['z_channels']} is not supported"
            )
        ch = int(ddconfig["ch"])
        return cls(
            in_channels=int(ddconfig.get("in_channels", 3)),
            out_channels=int(ddconfig.get("out_ch", 3)),
            latent_channels=int(embed_dim),
            block_out_channels=tuple(ch * int(m) for m in ddconfig["ch_mult"]),
            layers_per_block=int(ddconfig["num_res_blocks"]),
            norm_num_groups=32,  # LDM's Normalize() hard-codes 32 groups
            scaling_factor=scaling_factor,
            sample_size=int(ddconfig.get("resolution", 256)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `vae/config.json` dict; `from_diffusers` reads it back to this config."""
        n = len(self.block_out_channels)
        size = self.sample_size
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "force_upcast": True,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "latents_mean": None,
            "latents_std": None,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": self.mid_block_add_attention,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": list(size) if isinstance(size, tuple) else size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_post_quant_conv": self.use_post_quant_conv,
            "use_quant_conv": self.use_quant_conv,
        }

    def to_ldm(self) -> dict[str, Any]:
        """The original LDM/VD `ddconfig` dict (`from_ldm(d, latent_channels)` reads it back).

        `scaling_factor` is not part of it (LDM keeps it with the diffusion model).

        Raises:
          ValueError: naming the fields LDM's layout cannot express.
        """
        ch = self.block_out_channels[0]
        fixed = {
            "norm_num_groups": (self.norm_num_groups, 32),  # LDM's Normalize() hard-codes 32
            "shift_factor": (self.shift_factor, None),
            "use_quant_conv": (self.use_quant_conv, True),
            "use_post_quant_conv": (self.use_post_quant_conv, True),
            "mid_block_add_attention": (self.mid_block_add_attention, True),
        }
        bad = [f"{k}={got!r} (LDM has {want!r})" for k, (got, want) in fixed.items() if got != want]
        if any(c % ch for c in self.block_out_channels):
            bad.append(f"block_out_channels={list(self.block_out_channels)} (multiples of ch)")
        if not isinstance(self.sample_size, int):
            bad.append(f"sample_size={self.sample_size!r} (one int)")
        if bad:
            raise ValueError("the LDM layout cannot express " + ", ".join(bad))
        return {
            "double_z": True,
            "z_channels": self.latent_channels,
            "resolution": self.sample_size,
            "in_channels": self.in_channels,
            "out_ch": self.out_channels,
            "ch": ch,
            "ch_mult": [c // ch for c in self.block_out_channels],
            "num_res_blocks": self.layers_per_block,
            "attn_resolutions": [],
            "dropout": 0.0,
        }


class VAEAttention(nn.Module):
    """diffusers' VAE mid-block `Attention`: GroupNorm, one head of width C, residual."""

    norm_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = GroupNorm(self.norm_groups, _EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = qkv(y, y, c, ("to_q", "to_k", "to_v"), **kw)
        # heads=1: diffusers sets attention_head_dim = channels here, so the scale is C**-0.5.
        out = dense(c, name="to_out", **kw)(attention(q, k, v, heads=1))
        # rescale_output_factor is 1 in the VAE: a plain residual.
        return out.reshape(b, h, w, c) + x


class MidBlock(nn.Module):
    """diffusers' `UNetMidBlock2D` without time input: resnet, (attention), resnet."""

    channels: int
    norm_groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.norm_groups, _EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(self.norm_groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.norm_groups, _EPS, name="resnets_1", **kw)(x)


class ResnetLevel(nn.Module):
    """One level of the encoder or the decoder: resnets, then the level's resampler, if any.

    With `resample="down"` diffusers' `DownEncoderBlock2D` (a (0, 1)-padded stride-2 conv,
    `downsamplers_0`), with "up" its `UpDecoderBlock2D` (nearest x2 + conv, `upsamplers_0`);
    None, the innermost level of either, has no resampler.
    """

    out_channels: int
    num_layers: int
    norm_groups: int
    resample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.resample not in ("down", "up", None):
            raise ValueError(f"resample must be 'down', 'up' or None, got {self.resample!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.out_channels
        for j in range(self.num_layers):
            x = ResnetBlock2D(c, self.norm_groups, _EPS, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(c, padding="asymmetric", name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(c, name="upsamplers_0", **kw)(x)
        return x


class _EncoderDecoder(DtypesMixin, nn.Module):
    """What the encoder and the decoder share: the config, conv_in, levels, mid block and output.

    The `_*` helpers run inside the subclass's compact `__call__`, so the layers they create
    are its submodules, named as diffusers names them.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def _conv_in(self, x: jax.Array, channels: int) -> jax.Array:
        return conv2d(channels, 3, name="conv_in", **self.dtypes)(x.astype(self.dtype))

    @nn.nowrap
    def _levels(self, x: jax.Array, channels: tuple[int, ...], num_layers: int, resample: str):
        """`{resample}_blocks_{i}` for each width in `channels`, the last without a resampler."""
        for i, c in enumerate(channels):
            x = ResnetLevel(
                c,
                num_layers,
                self.config.norm_num_groups,
                resample if i < len(channels) - 1 else None,
                name=f"{resample}_blocks_{i}",
                **self.dtypes,
            )(x)
        return x

    @nn.nowrap
    def _mid(self, x: jax.Array, channels: int) -> jax.Array:
        cfg = self.config
        return MidBlock(
            channels,
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            name="mid_block",
            **self.dtypes,
        )(x)

    @nn.nowrap
    def _out(self, x: jax.Array, features: int) -> jax.Array:
        kw = self.dtypes
        x = nn.silu(GroupNorm(self.config.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x))
        return conv2d(features, 3, name="conv_out", **kw)(x)


class Encoder(_EncoderDecoder):
    """Image [B, H, W, C_in] -> [B, H/f, W/f, 2 * latent] (mean and logvar, before quant_conv)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        chans = cfg.block_out_channels
        x = self._conv_in(x, chans[0])
        x = self._levels(x, chans, cfg.layers_per_block, "down")
        x = self._mid(x, chans[-1])
        return self._out(x, 2 * cfg.latent_channels)


class Decoder(_EncoderDecoder):
    """Latent [B, h, w, latent] -> image [B, h*f, w*f, C_out] (after post_quant_conv)."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        rev = tuple(reversed(cfg.block_out_channels))
        x = self._conv_in(z, rev[0])
        x = self._mid(x, rev[0])
        # up_blocks_0 is the deepest level: diffusers orders them opposite to LDM's `up.{i}`.
        return self._out(self._levels(x, rev, cfg.layers_per_block + 1, "up"), cfg.out_channels)


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL`, channels-last.

    `encode` maps images in [-1, 1] to the posterior's (mean, logvar); `decode`
    maps (unscaled) latents back to images in about [-1, 1]. `__call__` runs
    encode -> mean -> decode so that `init` creates every parameter.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv2d(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv2d(cfg.latent_channels, 1, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior of images.

        Args:
          x: [B, H, W, in_channels] images in [-1, 1]; H and W multiples of the
            downsampling factor give exact latent sizes (others are floored as in torch).

        Returns:
          (mean, logvar), each [B, h, w, latent_channels]; logvar clamped to [-30, 20].
        """
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images from unscaled latents.

        Args:
          z: [B, h, w, latent_channels] latents (already divided by the scaling factor).

        Returns:
          [B, h*f, w*f, out_channels] images in about [-1, 1], not clamped.
        """
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def encode_images(
    model: AutoencoderKL,
    params: Any,
    images01: jax.Array,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Images in [0, 1] -> scaled latents, as VD's pipelines feed the diffuser.

    Args:
      model: the VAE module.
      params: its parameters (the `params` collection, not wrapped in {'params': ...}).
      images01: [B, H, W, C] images in [0, 1].
      rng: a PRNG key to sample the posterior; None takes its mean (deterministic).

    Returns:
      [B, h, w, latent_channels] float32 latents: (z - shift_factor) * scaling_factor.
    """
    cfg = model.config
    x = images01 * 2.0 - 1.0
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    mean = mean.astype(jnp.float32)
    if rng is None:
        z = mean
    else:
        std = jnp.exp(0.5 * logvar.astype(jnp.float32))
        z = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
    shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
    return (z - shift) * cfg.scaling_factor


def decode_latents(model: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents -> images in [0, 1] (the inverse of `encode_images`).

    Args:
      model: the VAE module.
      params: its parameters (the `params` collection).
      latents: [B, h, w, latent_channels] scaled latents.

    Returns:
      [B, h*f, w*f, C] float32 images clipped to [0, 1].
    """
    cfg = model.config
    shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
    z = latents.astype(jnp.float32) / cfg.scaling_factor + shift
    x = model.apply({"params": params}, z, method=AutoencoderKL.decode)
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
