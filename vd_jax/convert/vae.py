"""Key tables for the image VAE (`vd_jax.models.vae.AutoencoderKL`).

Three layouts of the same tensors:
- "diffusers": what current diffusers saves (`encoder.down_blocks.0.resnets.0.norm1.weight`,
  mid-block attention `to_q` / `to_k` / `to_v` / `to_out.0` as Linear weights);
- "diffusers_legacy": diffusers before 0.14 (the published VD folder's era), whose
  mid-block attention is `query` / `key` / `value` / `proj_attn`; `load_vae` picks it
  by itself when a "diffusers" state dict holds those names;
- "ldm": the original CompVis/SD/VD names (`kl-f8.pth`, or `autokl.` inside the old
  full VD checkpoint): `encoder.down.{i}.block.{j}`, `encoder.mid.attn_1.{q,k,v,proj_out}`
  stored as 1x1 convs, `nin_shortcut`, `norm_out`, and decoder `up.{i}` numbered from
  the *highest* resolution, i.e. LDM `up.{i}` is diffusers `up_blocks.{n-1-i}`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vd_jax.convert import core
from vd_jax.convert.core import Rule, conv, conv1x1_as_dense, linear, norm
from vd_jax.models.abstract import abstract_params
from vd_jax.models.vae import AutoencoderKL, VAEConfig

LAYOUTS = ("diffusers", "diffusers_legacy", "ldm")

# Neither layout stores buffers in the VAE (kl-f8.pth has exactly the 248 learned tensors),
# so nothing is ignored: every key must be consumed.
VAE_IGNORE: tuple[str, ...] = ()


def _resnet(src: str, dst: str, has_shortcut: bool, layout: str) -> list[Rule]:
    rules = norm(f"{src}.norm1", f"{dst}/norm1") + conv(f"{src}.conv1", f"{dst}/conv1")
    rules += norm(f"{src}.norm2", f"{dst}/norm2") + conv(f"{src}.conv2", f"{dst}/conv2")
    if has_shortcut:
        name = "nin_shortcut" if layout == "ldm" else "conv_shortcut"
        rules += conv(f"{src}.{name}", f"{dst}/conv_shortcut")
    return rules


def _attention(src: str, dst: str, layout: str) -> list[Rule]:
    if layout == "ldm":  # 1x1 convs [C, C, 1, 1]
        names = {"norm": "norm", "q": "q", "k": "k", "v": "v", "out": "proj_out"}
        proj = conv1x1_as_dense
    elif layout == "diffusers_legacy":
        names = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "out": "proj_attn"}
        proj = linear
    else:
        names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
        proj = linear
    rules = norm(f"{src}.{names['norm']}", f"{dst}/group_norm")
    for ours in ("q", "k", "v"):
        rules += proj(f"{src}.{names[ours]}", f"{dst}/to_{ours}")
    return rules + proj(f"{src}.{names['out']}", f"{dst}/to_out")


def _mid(src: str, dst: str, cfg: VAEConfig, layout: str) -> list[Rule]:
    if layout == "ldm":
        res = [f"{src}.block_1", f"{src}.block_2"]
        attn = f"{src}.attn_1"
    else:
        res = [f"{src}.resnets.0", f"{src}.resnets.1"]
        attn = f"{src}.attentions.0"
    rules = _resnet(res[0], f"{dst}/resnets_0", False, layout)
    rules += _resnet(res[1], f"{dst}/resnets_1", False, layout)
    if cfg.mid_block_add_attention:
        rules += _attention(attn, f"{dst}/attentions_0", layout)
    return rules


def _level(
    src: str, dst: str, widths: tuple[int, ...], i: int, resnets: int, kind: str, layout: str
) -> list[Rule]:
    """Level `i` of a half whose levels run through `widths`, `kind` "down" or "up"."""
    ldm = layout == "ldm"
    # Only a level's first resnet can change the width, so only it can have a shortcut conv.
    widens = i > 0 and widths[i - 1] != widths[i]
    rules: list[Rule] = []
    for j in range(resnets):
        res = f"{src}.block.{j}" if ldm else f"{src}.resnets.{j}"
        rules += _resnet(res, f"{dst}/resnets_{j}", j == 0 and widens, layout)
    if i < len(widths) - 1:  # the last level keeps its resolution
        sampler = f"{src}.{kind}sample.conv" if ldm else f"{src}.{kind}samplers.0.conv"
        rules += conv(sampler, f"{dst}/{kind}samplers_0/conv")
    return rules


def _encoder_rules(cfg: VAEConfig, layout: str, e: str) -> list[Rule]:
    ldm = layout == "ldm"
    chans = cfg.block_out_channels
    rules = conv(f"{e}.conv_in", "encoder/conv_in")
    for i in range(len(chans)):
        src = f"{e}.down.{i}" if ldm else f"{e}.down_blocks.{i}"
        dst = f"encoder/down_blocks_{i}"
        rules += _level(src, dst, chans, i, cfg.layers_per_block, "down", layout)
    rules += _mid(f"{e}.mid" if ldm else f"{e}.mid_block", "encoder/mid_block", cfg, layout)
    rules += norm(f"{e}.norm_out" if ldm else f"{e}.conv_norm_out", "encoder/conv_norm_out")
    return rules + conv(f"{e}.conv_out", "encoder/conv_out")


def _decoder_rules(cfg: VAEConfig, layout: str, d: str) -> list[Rule]:
    ldm = layout == "ldm"
    rev = tuple(reversed(cfg.block_out_channels))
    rules = conv(f"{d}.conv_in", "decoder/conv_in")
    rules += _mid(f"{d}.mid" if ldm else f"{d}.mid_block", "decoder/mid_block", cfg, layout)
    for i in range(len(rev)):
        # LDM numbers its up levels by resolution (0 = full size) and runs them backwards.
        src = f"{d}.up.{len(rev) - 1 - i}" if ldm else f"{d}.up_blocks.{i}"
        dst = f"decoder/up_blocks_{i}"
        rules += _level(src, dst, rev, i, cfg.layers_per_block + 1, "up", layout)
    rules += norm(f"{d}.norm_out" if ldm else f"{d}.conv_norm_out", "decoder/conv_norm_out")
    return rules + conv(f"{d}.conv_out", "decoder/conv_out")


def vae_rules(cfg: VAEConfig, layout: str = "diffusers", prefix: str = "") -> list[Rule]:
    """The key table of an `AutoencoderKL` checkpoint.

    Args:
      cfg: the VAE's sizes.
      layout: "diffusers", "diffusers_legacy" or "ldm" (see the module docstring).
      prefix: put in front of every torch key (e.g. "autokl." for the old full VD file,
        "first_stage_model." for an SD checkpoint).

    Returns:
      One `Rule` per tensor, torch key -> Flax param path.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rules = _encoder_rules(cfg, layout, f"{prefix}encoder")
    rules += _decoder_rules(cfg, layout, f"{prefix}decoder")
    if cfg.use_quant_conv:
        rules += conv(f"{prefix}quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        rules += conv(f"{prefix}post_quant_conv", "post_quant_conv")
    return rules


def abstract_vae_params(
    cfg: VAEConfig, param_dtype: Any = jnp.float32, image_size: int | None = None
) -> dict[str, Any]:
    """Shapes and dtypes of the VAE's params, computed without allocating them."""
    # The smallest legal image keeps tracing cheap; params do not depend on the size.
    size = image_size or cfg.downsampling_factor
    model = AutoencoderKL(cfg, param_dtype=param_dtype)
    x = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
    return abstract_params(model.init, jax.random.key(0), x)


def detect_layout(state: core.StateDict, prefix: str = "") -> str:
    """Guesses a VAE state dict's layout from its key names ("diffusers" when unsure)."""
    if f"{prefix}encoder.mid.block_1.conv1.weight" in state:
        return "ldm"
    if f"{prefix}encoder.mid_block.attentions.0.query.weight" in state:
        return "diffusers_legacy"
    return "diffusers"


def load_vae(
    state: core.StateDict,
    cfg: VAEConfig,
    layout: str = "diffusers",
    prefix: str = "",
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Converts a PyTorch `AutoencoderKL` state dict into Flax params.

    Args:
      state: the (lazy) state dict, e.g. from `core.read_state_dict`.
      cfg: the VAE's sizes; must match the file.
      layout: "diffusers" (a file in diffusers' legacy attention names is accepted too),
        "diffusers_legacy", "ldm", or "auto" to tell them apart by key names.
      prefix: in front of every key of the VAE in `state` (e.g. "autokl."); keys without
        it are left alone, so a whole checkpoint (the old full VD file) can be passed.
      param_dtype: dtype of the returned arrays.

    Returns:
      Nested dict of numpy arrays for `AutoencoderKL(cfg).apply({"params": ...})`.

    Raises:
      CheckpointError: listing every missing, unexpected or mis-shaped key.
    """
    # Only the VAE's own keys count: the rest of a full checkpoint is not "unexpected".
    state = state.under(prefix)
    if layout == "auto" or (
        layout == "diffusers" and detect_layout(state, prefix) == "diffusers_legacy"
    ):
        layout = detect_layout(state, prefix)
    return core.load_params(
        state,
        vae_rules(cfg, layout, prefix),
        abstract_vae_params(cfg, param_dtype),
        ignore=VAE_IGNORE,
        what=f"the image VAE ({layout} layout)",
    )
