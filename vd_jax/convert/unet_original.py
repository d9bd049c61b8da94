"""Key tables for VD's diffuser in SHI-Labs' original layouts -> the one `VDDiffuser` param tree.

Two namings of the same tensors: the new file (`vd-four-flow-v1-0-fp16.pth`, Feb 2023:
`diffuser.{image,text}.{data,context}_blocks.*`, the time MLP under `diffuser.image`) and the
deprecated old one (`model.diffusion_model.{time_embed,unet_image,unet_text}.*`, SD-style
`input_blocks` / `middle_block` / `output_blocks`). The configs are the original repo's
`openai_unet_2d_v1` / `openai_unet_0d_v1` arguments (`config_from_original`, and back with
`original_configs`). The diffusers naming is in convert/unet.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from vd_jax.convert.core import Rule, StateDict, conv, conv1x1_as_dense, linear, norm
from vd_jax.convert.unet import load_params_for_parts, transformer_rules
from vd_jax.models import layer_plan
from vd_jax.models import unet as unet_model
from vd_jax.models.unet import DiffuserConfig, normalize_parts

ORIGINAL_PREFIXES = {"new": "diffuser.", "old": "model.diffusion_model."}


def config_from_original(image: dict, text: dict) -> DiffuserConfig:
    """A `DiffuserConfig` from the original repo's `openai_unet_2d_v1` / `openai_unet_0d_v1` args.

    Raises:
      ValueError: naming the field the two diffusers disagree on.
    """
    mult = tuple(image["channel_mult"])
    attn = tuple(2**level in image["attention_resolutions"] for level in range(len(mult)))
    pairs = {
        "model_channels": (image["model_channels"], text["model_channels"]),
        "channel_mult": (mult, tuple(text["channel_mult"])),
        "attention_levels": (attn, tuple(bool(a) for a in text["with_attn"])),
        "num_res_blocks": (image["num_res_blocks"], text["num_noattn_blocks"]),
        "num_heads": (image["num_heads"], text["num_heads"]),
        "context_dim": (image["context_dim"], text["context_dim"]),
    }
    fields: dict[str, Any] = {}
    for key, (a, b) in pairs.items():
        if a != b:
            raise ValueError(f"diffuser.image and diffuser.text disagree on {key!r}: {a} vs {b}")
        fields[key] = a
    blocks = fields["num_res_blocks"]
    if isinstance(blocks, (list, tuple)):
        if len(set(blocks)) != 1:
            raise ValueError(f"num_res_blocks={blocks!r} differs between levels; VD's is uniform")
        fields["num_res_blocks"] = blocks[0]
    if text["input_channels"] != text["output_channels"] or len(set(text["second_dim"])) != 1:
        raise ValueError("text diffuser: input/output_channels differ or second_dim is not uniform")
    return DiffuserConfig(
        **fields,
        image_in_channels=image["in_channels"],
        image_out_channels=image["out_channels"],
        text_dim=text["input_channels"],
        text_second_dim=text["second_dim"][0],
    )


def original_configs(config: DiffuserConfig) -> tuple[dict, dict]:
    """The original repo's `diffuser.image` / `diffuser.text` args of `config`.

    The inverse of `config_from_original`.

    Raises:
      ValueError: naming the fields the original configs have no place for (they fix them).
    """
    fixed = {
        "norm_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "transformer_depth": 1,
    }
    bad = [f"{k}={getattr(config, k)!r}" for k, v in fixed.items() if getattr(config, k) != v]
    if bad:
        raise ValueError("the original diffuser configs cannot express " + ", ".join(bad))
    levels = config.num_levels
    shared = {
        "model_channels": config.model_channels,
        "channel_mult": list(config.channel_mult),
        "num_heads": config.num_heads,
        "context_dim": config.context_dim,
        "use_checkpoint": True,
    }
    image = {
        "in_channels": config.image_in_channels,
        "out_channels": config.image_out_channels,
        **shared,
        "attention_resolutions": [2**i for i, a in enumerate(config.attention_levels) if a],
        "num_res_blocks": [config.num_res_blocks] * levels,
        "parts": ["global", "data", "context"],
    }
    text = {
        "input_channels": config.text_dim,
        "output_channels": config.text_dim,
        **shared,
        "num_noattn_blocks": [config.num_res_blocks] * levels,
        "second_dim": [config.text_second_dim] * levels,
        "with_attn": list(config.attention_levels),
        "parts": ["data", "context"],
    }
    return image, text


def _original_names(config: DiffuserConfig, layout: str) -> tuple[list[str], list[str]]:
    """Module names (inside one branch) of the data and context blocks, in VD's order."""
    steps = layer_plan.data_steps(config)
    if layout == "new":
        data = [f"data_blocks.{s.index}.0" for s in steps]
        return data, [
            f"context_blocks.{j}.0" for j in range(len(layer_plan.context_widths(config)))
        ]
    if layout != "old":
        raise ValueError(f"layout must be 'new' or 'old', got {layout!r}")
    # The old (SD-style) layout groups a ResBlock, its attention and a following resampler
    # in one input_blocks / output_blocks entry.
    data, ctx = ["input_blocks.0.0"], []
    block = 0
    for level, has_attn in enumerate(config.attention_levels):
        for _ in range(config.num_res_blocks):
            block += 1
            data.append(f"input_blocks.{block}.0")
            if has_attn:
                ctx.append(f"input_blocks.{block}.1")
        if level != config.num_levels - 1:
            block += 1
            data.append(f"input_blocks.{block}.0")
    data += ["middle_block.0", "middle_block.2"]
    ctx.append("middle_block.1")
    block = 0
    for level in reversed(range(config.num_levels)):
        has_attn = config.attention_levels[level]
        for _ in range(config.num_res_blocks + 1):
            data.append(f"output_blocks.{block}.0")
            if has_attn:
                ctx.append(f"output_blocks.{block}.1")
            block += 1
        if level != 0:
            data.append(f"output_blocks.{block - 1}.{2 if has_attn else 1}")
    data.append("out")
    return data, ctx


def original_rules(
    config: DiffuserConfig, layout: str = "new", parts: Sequence[str] | None = None
) -> list[Rule]:
    """The key table for SHI-Labs' released checkpoints ('new' or deprecated 'old' naming).

    Args:
      config: the diffuser's sizes (`config_from_original` for the repo's yaml args).
      layout: 'new' (`diffuser.{image,text}.{data,context}_blocks.*`, the Feb-2023 fp16
        file) or 'old' (`model.diffusion_model.{time_embed,unet_image,unet_text}.*`).
      parts: param parts to map (default all).
    """
    parts = normalize_parts(parts)
    data_names, ctx_names = _original_names(config, layout)  # validates `layout`
    root = ORIGINAL_PREFIXES[layout]
    branch = {t: f"{root}{t}." if layout == "new" else f"{root}unet_{t}." for t in unet_model.TYPES}
    rules: list[Rule] = []
    if "global" in parts:
        time = f"{root}image.time_embed" if layout == "new" else f"{root}time_embed"
        rules += linear(f"{time}.0", "global/linear_1") + linear(f"{time}.2", "global/linear_2")
    for xtype in unet_model.TYPES:
        if f"data/{xtype}" in parts:
            steps = layer_plan.data_steps(config)
            for name, step in zip(data_names, steps, strict=True):
                rules += _original_data_rules(
                    branch[xtype] + name, f"data/{xtype}/blocks_{step.index}", step, xtype
                )
        if f"context/{xtype}" in parts:
            for j, name in enumerate(ctx_names):
                rules += transformer_rules(
                    branch[xtype] + name, f"context/{xtype}/blocks_{j}", config.transformer_depth
                )
    return rules


def _original_data_rules(src: str, dst: str, step: Any, xtype: str) -> list[Rule]:
    weight = conv if xtype == "image" else conv1x1_as_dense
    if step.kind == "res":  # ResBlock / FCBlock_MultiDim: same Sequential indices in both
        rules = norm(f"{src}.in_layers.0", f"{dst}/norm1") + weight(
            f"{src}.in_layers.2", f"{dst}/conv1"
        )
        rules += linear(f"{src}.emb_layers.1", f"{dst}/time_emb_proj")
        rules += norm(f"{src}.out_layers.0", f"{dst}/norm2") + weight(
            f"{src}.out_layers.3", f"{dst}/conv2"
        )
        if step.in_ch != step.out_ch:
            rules += weight(f"{src}.skip_connection", f"{dst}/conv_shortcut")
        return rules
    if step.kind == "out":  # Sequential(GroupNorm, SiLU, conv / Linear)
        last = conv if xtype == "image" else linear
        return norm(f"{src}.0", f"{dst}/norm") + last(
            f"{src}.2", f"{dst}/conv" if xtype == "image" else f"{dst}/linear"
        )
    if xtype == "text":  # Linear_MultiDim: the in-projection and the square "resamplers"
        return linear(src, f"{dst}/linear")
    suffix = {"in": "", "down": ".op", "up": ".conv"}[step.kind]
    return conv(src + suffix, f"{dst}/conv")


def load_original(
    state: StateDict,
    config: DiffuserConfig,
    layout: str = "new",
    parts: Sequence[str] | None = None,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """`VDDiffuser` params from an original VD checkpoint (new or old key naming).

    Only keys under the diffuser's prefix (`diffuser.` / `model.diffusion_model.`) are
    considered; VAE, CLIP, Optimus and schedule-buffer keys of the old full file are left
    to their own loaders. Within the diffuser, any missing, unexpected or mis-shaped key
    raises `CheckpointError`.
    """
    prefix = ORIGINAL_PREFIXES[layout]
    others = {k for k in state if not k.startswith(prefix)}
    return load_params_for_parts(
        state,
        config,
        lambda cfg, p: original_rules(cfg, layout, p),
        parts,
        param_dtype,
        others,
        f"VD diffuser ({layout} original layout)",
    )
