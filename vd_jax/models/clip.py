"""CLIP text and vision towers (transformers' `CLIPText/VisionModelWithProjection`) in Flax.

VD conditions its diffuser on *contexts* built from these towers (see
docs/original.md §4.1-4.2):

- text: `text_projection` of all 77 final-LN token states, every token divided by
  the L2 norm of the projected EOS (pooled) token;
- image: `visual_projection(post_layernorm(.))` of all 1+N tokens, every token
  divided by the L2 norm of the projected CLS token.

Parameter names mirror transformers' modules so that conversion is a rename plus
a transpose (vd_jax/convert/clip.py): `embeddings/...`, `encoder/layers_{i}/
{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1,fc2}, layer_norm2}`, then
`final_layer_norm` + `text_projection` (text) or `pre_layrnorm`, `post_layernorm`
+ `visual_projection` (vision). Activations are channels-last throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax.models.attention import attention
from vd_jax.models.layers import (
    ACTIVATIONS,
    MLP,
    LayerNorm,
    activation,
    conv2d,
    dense,
    pick_fields,
    qkv,
)

Dtype = Any

# ----------------------------------------------------------------------------- configs


def _tower_dict(d: Mapping[str, Any], tower: str) -> dict[str, Any]:
    """The tower's own config dict, from a tower config or a full `CLIPModel` config.

    A full config nests the tower under `text_config` / `vision_config`; very old
    files (openai/clip-vit-*) also carry `*_config_dict` overrides, which
    transformers applies on top of the nested dict. The projection width of a
    full `CLIPModel` is its top-level `projection_dim` (the nested one is unused
    there and often left at transformers' default of 512).
    """
    key = f"{tower}_config"
    if key not in d and f"{key}_dict" not in d:
        return dict(d)
    sub = dict(d.get(key) or {})
    sub.update(d.get(f"{key}_dict") or {})
    if "projection_dim" in d:
        sub["projection_dim"] = d["projection_dim"]
    return sub


class _TowerConfig:
    """`from_hf` of the two tower configs; each names its `_TOWER` and may `_fix` its dict."""

    _TOWER = ""

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> Self:
        """Reads a transformers `config.json` dict.

        Args:
          d: the tower's own config (`CLIPTextModel(WithProjection)` for the text tower,
            `CLIPVisionModel(WithProjection)` for the vision tower), or a full `CLIPModel`
            config (`text_config` / `vision_config` sub-dict, top-level `projection_dim`).

        Returns:
          The config; keys the dict lacks keep this class's defaults.
        """
        return cls(**pick_fields(cls, cls._fix(_tower_dict(d, cls._TOWER))))

    @staticmethod
    def _fix(sub: dict[str, Any]) -> dict[str, Any]:
        """The tower's dict with values transformers accepts in other forms made plain."""
        return sub

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict of the tower with its projection
        (`CLIP{Text,Vision}ModelWithProjection`); `from_hf` reads it back to this config."""
        name = self._TOWER.capitalize()
        return {
            "architectures": [f"CLIP{name}ModelWithProjection"],
            "model_type": f"clip_{self._TOWER}_model",
            **dataclasses.asdict(self),
        }


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_TowerConfig):
    """Text tower sizes; the defaults are openai/clip-vit-large-patch14's (VD's CLIP)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    # 2 is what openai/clip-vit-large-patch14's text_config says; it selects transformers'
    # legacy pooling rule (argmax of the ids). With CLIP's tokenizer (EOS 49407 is the
    # largest id, padding repeats it) both pooling rules pick the same position.
    eos_token_id: int = 2

    _TOWER = "text"

    @staticmethod
    def _fix(sub: dict[str, Any]) -> dict[str, Any]:
        if isinstance(sub.get("eos_token_id"), list | tuple):
            # transformers allows a list; its pooling compares against one id.
            sub["eos_token_id"] = sub["eos_token_id"][0]
        return sub


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_TowerConfig):
    """Vision tower sizes; the defaults are openai/clip-vit-large-patch14's (ViT-L/14, 224 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    _TOWER = "vision"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @staticmethod
    def _fix(sub: dict[str, Any]) -> dict[str, Any]:
        for k in ("image_size", "patch_size"):
            if isinstance(sub.get(k), list | tuple):
                h, w = sub[k]
                if h != w:
                    raise ValueError(f"non-square CLIP vision {k} {sub[k]} is not supported")
                sub[k] = h
        return sub


# ----------------------------------------------------------------------------- layers


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    **ACTIVATIONS,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return activation(name, _ACTIVATIONS, "CLIP hidden_act")


class CLIPAttention(nn.Module):
    """transformers' `CLIPAttention`: biased q/k/v/out projections, scaled dot product."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = qkv(x, x, c, ("q_proj", "k_proj", "v_proj"), **kw)
        return dense(c, name="out_proj", **kw)(attention(q, k, v, self.heads, mask))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.heads, name="self_attn", **kw)(h, mask)
        h = LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
        act = _activation(self.hidden_act)
        mlp = MLP(self.intermediate_size, act, ("fc1", "fc2"), name="mlp", **kw)
        return x + mlp(h)


class CLIPEncoder(nn.Module):
    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(
                self.heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x, mask)
        return x


def _encoder(cfg: CLIPTextConfig | CLIPVisionConfig, dtype: Dtype, param_dtype: Dtype):
    return CLIPEncoder(
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.hidden_act,
        cfg.layer_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _unit_norm_by(x: jax.Array, ref: jax.Array, dtype: Dtype) -> jax.Array:
    """x / ||ref|| with one norm per batch item (ref: [B, P]); the norm in float32."""
    n = jnp.linalg.norm(ref.astype(jnp.float32), axis=-1)[:, None, None]
    return (x.astype(jnp.float32) / n).astype(dtype)


# ----------------------------------------------------------------------------- text


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
        pos = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding", **kw
        )
        return tok + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextEncoder(nn.Module):
    """transformers' `CLIPTextModelWithProjection`, plus VD's text context.

    Causal self-attention and no padding mask: VD pads to 77 tokens and, like
    transformers without an `attention_mask`, lets tokens attend to the padding
    before them.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = _encoder(cfg, self.dtype, self.param_dtype)
        self.final_layer_norm = LayerNorm(cfg.layer_norm_eps, **kw)
        self.text_projection = dense(cfg.projection_dim, use_bias=False, **kw)

    def _hidden(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Final-LN token states [B, L, H] and the pooled (EOS) position [B]."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}"
            )
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        h = self.encoder(self.embeddings(input_ids), causal)
        h = self.final_layer_norm(h)
        if cfg.eos_token_id == 2:
            # transformers keeps this rule for configs written before its EOS-id fix: the EOS
            # token is taken to be the largest id; argmax returns its first occurrence.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        return h, eos_pos

    def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        """Runs the tower.

        Args:
          input_ids: [B, L] token ids, L <= max_position_embeddings.

        Returns:
          dict with `last_hidden_state` [B, L, H] (after final_layer_norm),
          `pooler_output` [B, H] (the EOS token's state) and `text_embeds` [B, P].
        """
        h, eos_pos = self._hidden(input_ids)
        pooled = h[jnp.arange(h.shape[0]), eos_pos]
        return {
            "last_hidden_state": h,
            "pooler_output": pooled,
            "text_embeds": self.text_projection(pooled),
        }

    def context(self, input_ids: jax.Array) -> jax.Array:
        """VD's text context: projected token states over the norm of the projected EOS state.

        Args:
          input_ids: [B, L] token ids (VD: 77, padded with max_length padding).

        Returns:
          [B, L, P] in `dtype`.
        """
        h, eos_pos = self._hidden(input_ids)
        z = self.text_projection(h)
        return _unit_norm_by(z, z[jnp.arange(z.shape[0]), eos_pos], self.dtype)


# ----------------------------------------------------------------------------- vision


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = pixel_values.shape[0]
        patches = conv2d(
            cfg.hidden_size,
            cfg.patch_size,
            stride=cfg.patch_size,
            padding=0,
            use_bias=False,
            name="patch_embedding",
            **kw,
        )(pixel_values.astype(self.dtype))
        # Row-major (h, w) flattening: the same patch order as torch's flatten(2) on NCHW.
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param(
            "class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.param_dtype
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        pos = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, name="position_embedding", **kw)
        return x + pos(jnp.arange(cfg.num_patches + 1))[None]


class CLIPVisionEncoder(nn.Module):
    """transformers' `CLIPVisionModelWithProjection` (NHWC input), plus VD's image context."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = LayerNorm(cfg.layer_norm_eps, **kw)
        self.encoder = _encoder(cfg, self.dtype, self.param_dtype)
        self.post_layernorm = LayerNorm(cfg.layer_norm_eps, **kw)
        self.visual_projection = dense(cfg.projection_dim, use_bias=False, **kw)

    def _hidden(self, pixel_values: jax.Array, token_weights: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (
            cfg.image_size,
            cfg.image_size,
            cfg.num_channels,
        ):
            # transformers refuses other sizes too unless asked to interpolate positions.
            raise ValueError(
                f"pixel_values must be [B, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.num_channels}] (NHWC), got {list(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values)
        if token_weights is not None:
            x = x * token_weights[..., None].astype(x.dtype)
        return self.encoder(self.pre_layrnorm(x))

    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        """Runs the tower.

        Args:
          pixel_values: [B, H, W, C] normalised pixels (see vd_jax.processing.images).

        Returns:
          dict with `last_hidden_state` [B, 1+N, H] (before post_layernorm, as in
          transformers), `pooler_output` [B, H] (post_layernorm of the CLS token) and
          `image_embeds` [B, P].
        """
        h = self._hidden(pixel_values)
        pooled = self.post_layernorm(h[:, 0])
        return {
            "last_hidden_state": h,
            "pooler_output": pooled,
            "image_embeds": self.visual_projection(pooled),
        }

    def context(self, pixel_values: jax.Array, token_weights: jax.Array | None = None) -> jax.Array:
        """VD's image context: projected post-LN tokens over the norm of the projected CLS.

        Args:
          pixel_values: [B, H, W, C] normalised pixels.
          token_weights: optional [B, 1+N] weights (VD's masked encoding, see
            `vd_jax.pipelines.applications.mask_token_weights`): they scale the input embeddings
            and, again, the output tokens.

        Returns:
          [B, 1+N, P] in `dtype`.
        """
        z = self.visual_projection(self.post_layernorm(self._hidden(pixel_values, token_weights)))
        z = _unit_norm_by(z, z[:, 0], self.dtype)
        if token_weights is not None:
            z = z * token_weights[..., None].astype(z.dtype)
        return z
