"""The Versatile Diffusion diffuser: one module, the paper's global / data / context split.

VD's four flows (text->image, image variation, image->text, text variation) share
one time-embedding MLP (`global`), have one set of data blocks per *data* type
(`data/image`: an SD-v1 U-Net's ResBlocks and resamplers; `data/text`: FC blocks
over a [C, 4] map) and one set of cross-attention blocks per *context* type
(`context/image`, `context/text`), each usable with either data type. The param
tree is exactly that split, with blocks numbered in execution order like the
original's `data_blocks.{i}` / `context_blocks.{j}`:

    {'global': ..., 'data': {'image': {blocks_0..}, 'text': {..}},
     'context': {'image': {blocks_0..}, 'text': {..}}}

so a flow needs (and `abstract_params(config, parts)` builds) only its parts.
Activations are channels-last: image latents [B, H, W, C], text latents [B, D],
text hidden states [B, 4, C] (see text_blocks.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax.models.abstract import abstract_params as model_abstract_params
from vd_jax.models.attention import IMPLEMENTATIONS
from vd_jax.models.layer_plan import Step, context_widths, data_steps, layer_plan
from vd_jax.models.layers import (
    Downsample2D,
    Dtype,
    NormActBlock,
    ResnetBlock2D,
    SpatialTransformer,
    Upsample2D,
    conv2d,
    dense,
    timestep_embedding,
)
from vd_jax.models.text_blocks import FCResBlock, TextIn, TextOut, TextResample

TYPES = ("image", "text")
ALL_PARTS = ("global", "data/image", "data/text", "context/image", "context/text")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DiffuserConfig:
    """Sizes of the four-flow diffuser; the defaults are the released VD model's."""

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8  # a head count, not a head width: d_head = channels / num_heads
    context_dim: int = 768
    transformer_depth: int = 1
    image_in_channels: int = 4
    image_out_channels: int = 4
    text_dim: int = 768
    text_second_dim: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # How the context blocks compute attention, not what (vd_jax.models.attention.IMPLEMENTATIONS):
    # 'auto' takes cuDNN's flash attention on a GPU in bf16/f16 where it was measured faster.
    attention: str = "auto"

    def __post_init__(self):
        if len(self.channel_mult) != len(self.attention_levels):
            raise ValueError("channel_mult and attention_levels must have one entry per level")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)


def normalize_parts(parts: Sequence[str] | str | None) -> tuple[str, ...]:
    """'data' / 'context' expand to both types; None means all; unknown names raise."""
    if parts is None:
        return ALL_PARTS
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    out = []
    for p in parts:
        expanded = [f"{p}/{t}" for t in TYPES] if p in ("data", "context") else [p]
        for e in expanded:
            if e not in ALL_PARTS:
                raise ValueError(f"unknown diffuser part {p!r}; expected some of {ALL_PARTS}")
            out.append(e)
    return tuple(p for p in ALL_PARTS if p in out)


# --------------------------------------------------------------------------- modules


class TimeEmbedding(nn.Module):
    """The one global layer: sinusoid (cos first) -> Linear -> SiLU -> Linear."""

    config: DiffuserConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = timestep_embedding(
            t, cfg.model_channels, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        ).astype(self.dtype)
        emb = nn.silu(dense(cfg.time_embed_dim, name="linear_1", **kw)(emb))
        return dense(cfg.time_embed_dim, name="linear_2", **kw)(emb)


class ImageIn(nn.Module):
    """Block 0 of the image branch: conv_in 3x3."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return conv2d(self.out_channels, 3, name="conv", **kw)(x)


class ImageOut(NormActBlock):
    """The last image block: GroupNorm - SiLU - conv 3x3 to the latent's channels."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.norm_silu(x, "norm")
        return conv2d(self.out_channels, 3, name="conv", **self.dtypes)(h)


class DataBlocks(nn.Module):
    """One data type's blocks, `blocks_{i}` in execution order; called one block at a time."""

    config: DiffuserConfig
    xtype: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.blocks = [self._make(step) for step in data_steps(self.config)]

    def _make(self, step: Step) -> nn.Module:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(norm_groups=cfg.norm_groups, epsilon=cfg.norm_eps)
        image = self.xtype == "image"
        if step.kind == "in":
            return (
                ImageIn(step.out_ch, **kw)
                if image
                else TextIn(step.out_ch, cfg.text_second_dim, **kw)
            )
        if step.kind == "res":
            return (
                ResnetBlock2D(step.out_ch, **norm, **kw)
                if image
                else FCResBlock(step.out_ch, **norm, **kw)
            )
        if step.kind == "down":
            return Downsample2D(step.out_ch, **kw) if image else TextResample(**kw)
        if step.kind == "up":
            return Upsample2D(step.out_ch, **kw) if image else TextResample(**kw)
        if image:
            return ImageOut(cfg.image_out_channels, **norm, **kw)
        return TextOut(cfg.text_dim, **norm, **kw)

    def __call__(self, index: int, h: jax.Array, emb: jax.Array) -> jax.Array:
        if data_steps(self.config)[index].kind in ("down", "up") and self.xtype == "image":
            return self.blocks[index](h)  # the image resamplers take no time embedding
        return self.blocks[index](h, emb)


class ContextBlocks(nn.Module):
    """One context type's cross-attention blocks, `blocks_{j}`; serve either data type."""

    config: DiffuserConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.blocks = [
            SpatialTransformer(
                cfg.num_heads,
                cfg.transformer_depth,
                cfg.norm_groups,
                cfg.attention,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
            for _ in context_widths(cfg)
        ]

    def __call__(self, index: int, h: jax.Array, context: jax.Array) -> jax.Array:
        return self.blocks[index](h, context)


class Group(nn.Module):
    """`data` or `context`: holds the `image` and `text` sets as sub-modules of those names."""

    config: DiffuserConfig
    role: str  # 'data' or 'context'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.role == "data":
            self.image = DataBlocks(self.config, "image", **kw)
            self.text = DataBlocks(self.config, "text", **kw)
        else:
            self.image = ContextBlocks(self.config, **kw)
            self.text = ContextBlocks(self.config, **kw)


class VDDiffuser(nn.Module):
    """VD's four-flow diffuser: ε-prediction for image or text latents under image/text contexts.

    Attributes:
      config: the sizes.
      dtype: compute dtype (norm statistics and softmax stay float32).
      param_dtype: storage dtype of the params.
    """

    config: DiffuserConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # 'global' is a Python keyword, hence setattr; the param subtree is still named 'global'.
        setattr(self, "global", TimeEmbedding(self.config, **kw))
        self.data = Group(self.config, "data", **kw)
        self.context = Group(self.config, "context", **kw)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        contexts: Sequence[jax.Array],
        *,
        xtype: str,
        ctypes: Sequence[str],
        ratios: Sequence[Any] | None = None,
    ) -> jax.Array:
        """Predicts the noise ε of `x` at timestep `t` under one or several contexts.

        Args:
          x: image latents [B, H, W, C] (xtype 'image') or text latents [B, D] ('text').
          t: [B] (or scalar) timesteps, int or float.
          contexts: one [B, L_k, context_dim] array per context.
          xtype: 'image' or 'text' (static): which data blocks run.
          ctypes: 'image' / 'text' per context (static): which context blocks serve it;
            a type may repeat with different tokens.
          ratios: mixing weights per context, normalised to sum to 1 (default: equal).
            With several contexts every cross-attention slot returns
            h + Σ_k r_k (block_k(h, c_k) - h), VD's "attention" mixing (dual guidance).

        Returns:
          ε with the shape of `x`, in `dtype`.
        """
        _check_xtype(xtype)
        return self._run(x, t, xtype, self._context_slot(ctypes, contexts, ratios))

    def call_segments(
        self,
        x: jax.Array,
        t: jax.Array,
        segments: Sequence[tuple[int, Sequence[str], Sequence[jax.Array], Sequence[Any] | None]],
        *,
        xtype: str,
        shards: int = 1,
    ) -> jax.Array:
        """ε for several flows of one data type in one pass (mixed-flow training).

        The time embedding and the data blocks run once over every segment's rows; at each
        cross-attention slot each segment's rows go through its own context blocks. Per
        example this is `__call__` (every layer but attention works per example, and
        attention stays within a segment), with one data-block pass instead of one per flow:
        half the data-block kernels for two flows, each on twice the rows, and a smaller
        program to compile.

        Args:
          x: latents of all segments, laid out by `merge_segments(..., shards)`.
          t: [B] timesteps in the same layout.
          segments: per segment `(rows, ctypes, contexts, ratios)`: its total row count and
            `__call__`'s arguments for it (contexts with `rows` rows).
          xtype: the data type of every segment.
          shards: the layout's block count (`merge_segments`); the batch's device count keeps
            each device's rows on it.

        Returns:
          ε in the layout of `x`; `split_segments(eps, rows, shards)` gives each segment's.
        """
        _check_xtype(xtype)
        rows = [int(seg[0]) for seg in segments]
        if sum(rows) != x.shape[0] or any(r % shards for r in rows):
            raise ValueError(
                f"segment rows {rows} must sum to the batch ({x.shape[0]}) and each divide "
                f"into {shards} shards"
            )
        slots = [self._context_slot(c, ctx, r) for _, c, ctx, r in segments]

        def context_slot(j: int, h: jax.Array) -> jax.Array:
            parts = split_segments(h, rows, shards)
            return merge_segments([s(j, p) for s, p in zip(slots, parts, strict=True)], shards)

        return self._run(x, t, xtype, context_slot)

    def _run(self, x, t, xtype: str, context_slot):
        """The time embedding, then the data blocks of `xtype` with `context_slot` at each
        cross-attention slot."""
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        emb = getattr(self, "global")(t)
        return self._walk(getattr(self.data, xtype), x.astype(self.dtype), emb, context_slot)

    def _context_slot(self, ctypes, contexts, ratios):
        """`(j, h) -> h'`: cross-attention slot j under these contexts (mixed by `ratios`)."""
        ctypes = tuple(ctypes)
        if not ctypes or any(c not in TYPES for c in ctypes):
            raise ValueError(f"ctypes must be 'image' or 'text', got {ctypes!r}")
        if len(contexts) != len(ctypes):
            raise ValueError(f"{len(contexts)} contexts but {len(ctypes)} ctypes")
        if ratios is None:
            ratios = [1.0] * len(ctypes)
        if len(ratios) != len(ctypes):
            raise ValueError(f"{len(ratios)} ratios for {len(ctypes)} contexts")
        weights = jnp.stack([jnp.asarray(r, jnp.float32) for r in ratios])
        weights = (weights / weights.sum()).astype(self.dtype)
        blocks = [getattr(self.context, c) for c in ctypes]
        contexts = [c.astype(self.dtype) for c in contexts]

        def context_slot(j: int, h: jax.Array) -> jax.Array:
            if len(blocks) == 1:
                return blocks[0](j, h, contexts[0])
            delta = sum(
                w * (blk(j, h, c) - h) for w, blk, c in zip(weights, blocks, contexts, strict=True)
            )
            return h + delta

        return context_slot

    @staticmethod
    def _walk(data, h, emb, context_slot):
        saved = []
        for step in layer_plan(data.config):
            if step.op == "d":
                h = data(step.index, h, emb)
            elif step.op == "c":
                h = context_slot(step.index, h)
            elif step.op == "save":
                saved.append(h)
            else:  # skips are concatenated on channels, last saved first
                h = jnp.concatenate([h, saved.pop()], axis=-1)
        return h

    def init_parts(self, parts: Sequence[str] | None = None, context_len: int = 2) -> None:
        """Touches exactly the sub-modules of `parts` so that `init` creates their params.

        Use as `model.init(rng, parts, method=VDDiffuser.init_parts)`; data blocks run
        on dummy inputs with the cross-attention slots skipped, each context block on a
        dummy 4-token map of its width.
        """
        cfg = self.config
        parts = normalize_parts(parts)
        emb = jnp.zeros((1, cfg.time_embed_dim), self.dtype)
        if "global" in parts:
            emb = getattr(self, "global")(jnp.zeros((1,)))
        side = 2 ** (cfg.num_levels - 1)
        dummy = {
            "image": jnp.zeros((1, side, side, cfg.image_in_channels), self.dtype),
            "text": jnp.zeros((1, cfg.text_dim), self.dtype),
        }
        for xtype in TYPES:
            if f"data/{xtype}" in parts:
                self._walk(getattr(self.data, xtype), dummy[xtype], emb, lambda j, h: h)
        ctx = jnp.zeros((1, context_len, cfg.context_dim), self.dtype)
        for ctype in TYPES:
            if f"context/{ctype}" in parts:
                for j, width in enumerate(context_widths(cfg)):
                    getattr(self.context, ctype)(j, jnp.zeros((1, 4, width), self.dtype), ctx)


def _check_xtype(xtype: str) -> None:
    if xtype not in TYPES:
        raise ValueError(f"xtype must be 'image' or 'text', got {xtype!r}")


def merge_segments(arrays: Sequence[jax.Array], shards: int = 1) -> jax.Array:
    """Rows of several arrays as one: `shards` blocks, each holding its share of every array.

    Shard i of the result is shard i of each input, so with `shards` = the device count
    of a batch-sharded layout the merge (and `split_segments`) moves no row between devices.
    """
    blocks = [a.reshape(shards, a.shape[0] // shards, *a.shape[1:]) for a in arrays]
    out = jnp.concatenate(blocks, axis=1)
    return out.reshape(-1, *out.shape[2:])


def split_segments(x: jax.Array, rows: Sequence[int], shards: int = 1) -> list[jax.Array]:
    """The inverse of `merge_segments`: `rows` are each array's total row counts."""
    per = [r // shards for r in rows]
    blocks = x.reshape(shards, sum(per), *x.shape[1:])
    out, start = [], 0
    for n in per:
        out.append(blocks[:, start : start + n].reshape(shards * n, *x.shape[1:]))
        start += n
    return out


def init_params(
    config: DiffuserConfig,
    rng: jax.Array,
    parts: Sequence[str] | None = None,
    *,
    param_dtype: Dtype = jnp.float32,
) -> dict[str, Any]:
    """Random params for `parts` (default all), e.g. ('global', 'data/image', 'context/text')."""
    model = VDDiffuser(config, param_dtype=param_dtype)
    parts = normalize_parts(parts)
    init = jax.jit(lambda key: model.init(key, parts, method=VDDiffuser.init_parts))
    return jax.tree_util.tree_map(lambda x: x, dict(init(rng)["params"]))


def abstract_params(
    config: DiffuserConfig,
    parts: Sequence[str] | None = None,
    *,
    param_dtype: Dtype = jnp.float32,
) -> dict[str, Any]:
    """Shapes/dtypes (`jax.ShapeDtypeStruct`) of the params of `parts`; allocates nothing."""
    model = VDDiffuser(config, param_dtype=param_dtype)
    parts = normalize_parts(parts)
    return model_abstract_params(
        lambda: model.init(jax.random.key(0), parts, method=VDDiffuser.init_parts)
    )
