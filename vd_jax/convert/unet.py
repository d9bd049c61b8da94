"""Key tables for VD's diffuser: diffusers' two U-Nets -> the one `VDDiffuser` param tree.

diffusers splits VD's four-flow diffuser into `image_unet` (a `UNet2DConditionModel`
holding the time MLP, the image data blocks and the *image*-context attentions) and
`text_unet` (a `UNetFlatConditionModel` holding the text data blocks, the
*text*-context attentions and a second copy of the time MLP). The tables here take
a merged state dict whose keys carry the prefixes `image_unet.` and `text_unet.`
(`merge(read_state_dict(a).prefixed('image_unet.'), read_state_dict(b).prefixed(...))`).

text_unet's time embedding: the converter copies the one original time MLP into both
U-Nets and diffusers never runs text_unet's copy, so it is *ignored* by
`load_diffuser` (neither mapped nor reported as unexpected);
`text_unet_time_embedding_keys` lists those keys with the image_unet keys they
should equal, for callers that want to check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from vd_jax.convert.core import (
    Rule,
    StateDict,
    conv,
    conv1x1_as_dense,
    linear,
    load_params,
    norm,
)
from vd_jax.models import layer_plan
from vd_jax.models import unet as unet_model
from vd_jax.models.unet import DiffuserConfig, normalize_parts

IMAGE_PREFIX = "image_unet."
TEXT_PREFIX = "text_unet."
_TIME_KEYS = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")

# --------------------------------------------------------------------------- configs

# Options of diffusers' U-Nets that VD's diffuser does not have: field -> the only accepted value.
_FIXED = {
    "center_input_sample": False,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "only_cross_attention": False,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}

# DiffuserConfig field -> the diffusers config field it is read from (for error messages).
_SOURCE_FIELD = {
    "model_channels": "block_out_channels",
    "channel_mult": "block_out_channels",
    "attention_levels": "down_block_types",
    "num_res_blocks": "layers_per_block",
    "num_heads": "attention_head_dim",
    "context_dim": "cross_attention_dim",
    "transformer_depth": "transformer_layers_per_block",
    "norm_groups": "norm_num_groups",
}


def _uniform(cfg: dict, name: str, field: str, default: Any) -> Any:
    """A per-level int-or-list field that VD needs to be the same on every level."""
    value = cfg.get(field, default)
    if isinstance(value, (list, tuple)):
        if len({str(v) for v in value}) != 1:
            raise ValueError(f"{name}: {field}={value!r} differs between levels; VD's is uniform")
        value = value[0]
    return value


def _parse(cfg: dict, name: str, *, flat: bool) -> dict[str, Any]:
    suffix = "Flat" if flat else "2D"
    for field, want in _FIXED.items():
        got = cfg.get(field, want)
        if got != want:
            raise ValueError(f"{name}: unsupported {field}={got!r} (VD's diffuser needs {want!r})")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn = []
    for t in down:
        if t not in (f"CrossAttnDownBlock{suffix}", f"DownBlock{suffix}"):
            raise ValueError(f"{name}: unsupported down_block_types entry {t!r}")
        attn.append(t.startswith("CrossAttn"))
    want_up = [f"CrossAttnUpBlock{suffix}" if a else f"UpBlock{suffix}" for a in reversed(attn)]
    if up != want_up:
        raise ValueError(f"{name}: up_block_types={up!r} does not mirror down_block_types")
    mid = cfg.get("mid_block_type", f"UNetMidBlock{suffix}CrossAttn")
    if mid != f"UNetMidBlock{suffix}CrossAttn":
        raise ValueError(f"{name}: unsupported mid_block_type={mid!r}")
    boc = list(cfg["block_out_channels"])
    if len(boc) != len(down) or any(c % boc[0] for c in boc):
        raise ValueError(f"{name}: block_out_channels={boc!r} must be multiples of the first")
    if cfg.get("norm_num_groups", 32) is None:
        raise ValueError(f"{name}: norm_num_groups=None (no output norm) is not VD's layout")
    fields = {
        "model_channels": boc[0],
        "channel_mult": tuple(c // boc[0] for c in boc),
        "attention_levels": tuple(attn),
        "num_res_blocks": _uniform(cfg, name, "layers_per_block", 2),
        # diffusers' num_attention_heads falls back to attention_head_dim, so for VD (and
        # SD-v1) "attention_head_dim": 8 is the number of heads, not their width.
        "num_heads": _uniform(cfg, name, "attention_head_dim", 8),
        "context_dim": _uniform(cfg, name, "cross_attention_dim", 1280),
        "transformer_depth": _uniform(cfg, name, "transformer_layers_per_block", 1),
        "norm_groups": cfg.get("norm_num_groups", 32),
        "norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)),
        "freq_shift": cfg.get("freq_shift", 0),
    }
    in_ch, out_ch = cfg.get("in_channels", 4), cfg.get("out_channels", 4)
    if not flat:
        return fields | {"image_in_channels": in_ch, "image_out_channels": out_ch}
    # The flat U-Net's in/out "channels" are multi-dim shapes, [768, 1, 1] for VD; its second
    # dim (4) is hard-wired in diffusers' LinearMultiDim / ResnetBlockFlat defaults.
    shape = list(in_ch) if isinstance(in_ch, (list, tuple)) else [in_ch]
    if len(shape) != 3 or shape[1:] != [1, 1]:
        raise ValueError(f"{name}: in_channels={in_ch!r}; VD's text U-Net has [D, 1, 1]")
    if not isinstance(out_ch, (list, tuple)) or list(out_ch) != shape:
        raise ValueError(f"{name}: out_channels={out_ch!r} must equal in_channels={in_ch!r}")
    return fields | {"text_dim": shape[0], "text_second_dim": 4}


def diffuser_config_from_diffusers(
    image_unet: dict, text_unet: dict | None = None
) -> DiffuserConfig:
    """The `DiffuserConfig` of diffusers' `image_unet/config.json` (+ `text_unet/config.json`).

    Args:
      image_unet: the `UNet2DConditionModel` config dict.
      text_unet: the `UNetFlatConditionModel` config dict, or None for an image-only
        diffuser (the text sizes then keep their defaults).

    Raises:
      ValueError: naming the field, for an option VD's diffuser does not have or
        when the two U-Nets disagree on layer order or widths.
    """
    fields = _parse(image_unet, "image_unet", flat=False)
    if text_unet is not None:
        text = _parse(text_unet, "text_unet", flat=True)
        for key, value in text.items():
            if key in fields and fields[key] != value:
                raise ValueError(
                    f"text_unet and image_unet disagree on {_SOURCE_FIELD.get(key, key)!r}: "
                    f"{value!r} vs {fields[key]!r}"
                )
        fields |= text
    return DiffuserConfig(**fields)


def diffusers_configs(config: DiffuserConfig, sample_size: int | None = None) -> tuple[dict, dict]:
    """The `image_unet/config.json` and `text_unet/config.json` dicts of `config`.

    The inverse of `diffuser_config_from_diffusers`: reading the two dicts back gives
    `config` again (up to `attention`, which says how to compute, not what).

    Args:
      config: the diffuser's sizes.
      sample_size: the image U-Net's default latent size (None leaves diffusers' unset).

    Raises:
      ValueError: for a text U-Net whose second dim is not 4 (diffusers hard-wires 4).
    """
    if config.text_second_dim != 4:
        raise ValueError(
            f"text_second_dim={config.text_second_dim}: diffusers' flat U-Net hard-wires 4"
        )
    shared = {
        **_FIXED,
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        # diffusers reads a VD/SD-v1 attention_head_dim as the number of heads.
        "attention_head_dim": config.num_heads,
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        "norm_num_groups": config.norm_groups,
        "norm_eps": config.norm_eps,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        "dropout": 0.0,
        "upcast_attention": False,
        "mid_block_only_cross_attention": None,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }
    configs = []
    for flat in (False, True):
        suffix = "Flat" if flat else "2D"
        down = [
            f"CrossAttnDownBlock{suffix}" if a else f"DownBlock{suffix}"
            for a in config.attention_levels
        ]
        up = [
            f"CrossAttnUpBlock{suffix}" if a else f"UpBlock{suffix}"
            for a in reversed(config.attention_levels)
        ]
        text_shape = [config.text_dim, 1, 1]
        configs.append(
            {
                "_class_name": "UNetFlatConditionModel" if flat else "UNet2DConditionModel",
                **shared,
                "down_block_types": down,
                "up_block_types": up,
                "mid_block_type": f"UNetMidBlock{suffix}CrossAttn",
                "in_channels": text_shape if flat else config.image_in_channels,
                "out_channels": text_shape if flat else config.image_out_channels,
                "sample_size": None if flat else sample_size,
            }
        )
    return configs[0], configs[1]


# --------------------------------------------------------------------------- module names


def _diffusers_names(config: DiffuserConfig) -> tuple[list[str], list[str]]:
    """diffusers module names of the data blocks and the context blocks, in VD's order."""
    data, ctx = ["conv_in"], []
    n = config.num_res_blocks
    for level, has_attn in enumerate(config.attention_levels):
        for r in range(n):
            data.append(f"down_blocks.{level}.resnets.{r}")
            if has_attn:
                ctx.append(f"down_blocks.{level}.attentions.{r}")
        if level != config.num_levels - 1:
            data.append(f"down_blocks.{level}.downsamplers.0")
    data += ["mid_block.resnets.0", "mid_block.resnets.1"]
    ctx.append("mid_block.attentions.0")
    for k, has_attn in enumerate(reversed(config.attention_levels)):
        for r in range(n + 1):
            data.append(f"up_blocks.{k}.resnets.{r}")
            if has_attn:
                ctx.append(f"up_blocks.{k}.attentions.{r}")
        if k != config.num_levels - 1:
            data.append(f"up_blocks.{k}.upsamplers.0")
    data.append("out")
    return data, ctx


def transformer_rules(src: str, dst: str, depth: int) -> list[Rule]:
    """A `Transformer2DModel` / original `SpatialTransformer` (same names in both)."""
    rules = norm(f"{src}.norm", f"{dst}/norm") + conv1x1_as_dense(
        f"{src}.proj_in", f"{dst}/proj_in"
    )
    for i in range(depth):
        s, d = f"{src}.transformer_blocks.{i}", f"{dst}/transformer_blocks_{i}"
        for n in ("norm1", "norm2", "norm3"):
            rules += norm(f"{s}.{n}", f"{d}/{n}")
        for a in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v"):
                rules += linear(f"{s}.{a}.{p}", f"{d}/{a}/{p}", bias=False)
            rules += linear(f"{s}.{a}.to_out.0", f"{d}/{a}/to_out")
        rules += linear(f"{s}.ff.net.0.proj", f"{d}/ff/proj") + linear(
            f"{s}.ff.net.2", f"{d}/ff/out"
        )
    return rules + conv1x1_as_dense(f"{src}.proj_out", f"{dst}/proj_out")


def _diffusers_data_rules(config: DiffuserConfig, xtype: str, prefix: str) -> list[Rule]:
    names, _ = _diffusers_names(config)
    steps = layer_plan.data_steps(config)
    # Image convs are real convs; the text U-Net's "convs" are 1x1 convs over [4C, 1, 1].
    weight = conv if xtype == "image" else conv1x1_as_dense
    rules: list[Rule] = []
    for name, step in zip(names, steps, strict=True):
        src, dst = prefix + name, f"data/{xtype}/blocks_{step.index}"
        if step.kind == "res":
            rules += norm(f"{src}.norm1", f"{dst}/norm1") + weight(f"{src}.conv1", f"{dst}/conv1")
            rules += linear(f"{src}.time_emb_proj", f"{dst}/time_emb_proj")
            rules += norm(f"{src}.norm2", f"{dst}/norm2") + weight(f"{src}.conv2", f"{dst}/conv2")
            if step.in_ch != step.out_ch:
                rules += weight(f"{src}.conv_shortcut", f"{dst}/conv_shortcut")
        elif step.kind == "out":
            rules += norm(f"{prefix}conv_norm_out", f"{dst}/norm")
            rules += (
                conv(f"{prefix}conv_out", f"{dst}/conv")
                if xtype == "image"
                else linear(f"{prefix}conv_out", f"{dst}/linear")
            )
        elif xtype == "image":  # conv_in, downsamplers.0.conv, upsamplers.0.conv
            rules += conv(src if step.kind == "in" else f"{src}.conv", f"{dst}/conv")
        else:  # conv_in and the resamplers are LinearMultiDim, i.e. nn.Linear
            rules += linear(src, f"{dst}/linear")
    return rules


def diffusers_rules(config: DiffuserConfig, parts: Sequence[str] | None = None) -> list[Rule]:
    """The key table from diffusers' `image_unet.*` / `text_unet.*` keys to `VDDiffuser` params.

    Args:
      config: the diffuser's sizes.
      parts: which param parts to map (default all; see `unet.normalize_parts`).

    Returns:
      The rules; text_unet's time embedding is deliberately not among them.
    """
    parts = normalize_parts(parts)
    rules: list[Rule] = []
    if "global" in parts:
        for n in ("linear_1", "linear_2"):
            rules += linear(f"{IMAGE_PREFIX}time_embedding.{n}", f"global/{n}")
    for xtype, prefix in (("image", IMAGE_PREFIX), ("text", TEXT_PREFIX)):
        if f"data/{xtype}" in parts:
            rules += _diffusers_data_rules(config, xtype, prefix)
        if f"context/{xtype}" in parts:
            _, names = _diffusers_names(config)
            for j, name in enumerate(names):
                rules += transformer_rules(
                    prefix + name, f"context/{xtype}/blocks_{j}", config.transformer_depth
                )
    return rules


def text_unet_time_embedding_keys(config: DiffuserConfig) -> dict[str, str]:
    """text_unet's unused time-MLP keys -> the image_unet keys they should equal."""
    del config  # the names do not depend on the sizes
    return {
        f"{TEXT_PREFIX}time_embedding.{k}": f"{IMAGE_PREFIX}time_embedding.{k}" for k in _TIME_KEYS
    }


def _only(state: StateDict, drop: set[str]) -> StateDict:
    """`state` without the keys in `drop`."""
    keep = [k for k in state if k not in drop]
    return StateDict(
        {k: state.shape(k) for k in keep},
        state.__getitem__,
        state.source,
        {k: state.dtype(k) for k in keep if state.dtype(k)},
    )


def load_params_for_parts(
    state: StateDict,
    config: DiffuserConfig,
    table: Any,
    parts: Sequence[str] | None,
    param_dtype: Any,
    ignore: set[str],
    what: str,
) -> dict[str, Any]:
    """Loads `parts` with `table(config, parts)`; keys of the other parts are known, not loaded.

    Keys that belong to unselected parts are dropped before the strict check, so a
    full checkpoint can feed a one-flow model while a stray or misspelled key still fails.
    """
    parts = normalize_parts(parts)
    every = {r.src for r in table(config, None)}
    wanted = {r.src for r in table(config, parts)}
    view = _only(state, (every - wanted) | ignore)
    abstract = unet_model.abstract_params(config, parts, param_dtype=param_dtype)
    return load_params(view, table(config, parts), abstract, what=what)


def load_diffuser(
    state: StateDict,
    config: DiffuserConfig,
    parts: Sequence[str] | None = None,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """`VDDiffuser` params for `parts` from a merged diffusers state dict.

    Args:
      state: `image_unet.*` + `text_unet.*` keys (either may be absent if `parts` do not
        need it).
      config: the diffuser's sizes (e.g. `diffuser_config_from_diffusers`).
      parts: param parts to load (default all), e.g. `vd_jax.flows.parts(['text_to_image'])`.
      param_dtype: dtype of the returned arrays.

    Raises:
      CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    ignore = set(text_unet_time_embedding_keys(config))
    return load_params_for_parts(
        state, config, diffusers_rules, parts, param_dtype, ignore, "VD diffuser (diffusers)"
    )
