"""transformers CLIP state dicts -> vd_jax.models.clip params.

The tables read the key names of `CLIPTextModelWithProjection`
(`text_model.*`, `text_projection.weight`) and `CLIPVisionModelWithProjection`
(`vision_model.*`, `visual_projection.weight`). A full `CLIPModel` uses the same
names for both towers side by side, so with a `prefix` the same tables read
VD's old-format checkpoint (`clip.model.*`) or the new code's two CLIP copies
(`ctx.text.model.*`, `ctx.image.model.*`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from vd_jax.convert import core
from vd_jax.convert.core import Rule, StateDict, conv, embedding, linear, norm
from vd_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPVisionConfig,
    CLIPVisionEncoder,
)

# Non-persistent buffers that files written by transformers < ~4.31 still contain.
CLIP_IGNORE: tuple[str, ...] = (r".*position_ids",)


def clip_ignore(tower: str, prefix: str = "") -> list[str]:
    """Ignore patterns for loading one tower from a full `CLIPModel` state dict.

    Args:
      tower: "text" or "vision", the tower being loaded.
      prefix: the prefix of the CLIPModel's keys ("clip.model." in VD's old file).

    Returns:
      Regexes (fully matched) for the position-id buffers, `logit_scale` and every
      key of the other tower.
    """
    p = re.escape(prefix)
    if tower == "text":
        other = [rf"{p}vision_model\..*", rf"{p}visual_projection\.weight"]
    elif tower == "vision":
        other = [rf"{p}text_model\..*", rf"{p}text_projection\.weight"]
    else:
        raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
    return [*CLIP_IGNORE, rf"{p}logit_scale", *other]


def _encoder_rules(src: str, num_layers: int) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(num_layers):
        s, d = f"{src}.encoder.layers.{i}", f"encoder/layers_{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear(f"{s}.self_attn.{proj}", f"{d}/self_attn/{proj}")
        rules += norm(f"{s}.layer_norm1", f"{d}/layer_norm1")
        rules += linear(f"{s}.mlp.fc1", f"{d}/mlp/fc1")
        rules += linear(f"{s}.mlp.fc2", f"{d}/mlp/fc2")
        rules += norm(f"{s}.layer_norm2", f"{d}/layer_norm2")
    return rules


def clip_text_rules(cfg: CLIPTextConfig, prefix: str = "") -> list[Rule]:
    """Key table of the text tower (`{prefix}text_model.*`, `{prefix}text_projection`)."""
    t = f"{prefix}text_model"
    return [
        *embedding(f"{t}.embeddings.token_embedding", "embeddings/token_embedding"),
        *embedding(f"{t}.embeddings.position_embedding", "embeddings/position_embedding"),
        *_encoder_rules(t, cfg.num_hidden_layers),
        *norm(f"{t}.final_layer_norm", "final_layer_norm"),
        *linear(f"{prefix}text_projection", "text_projection", bias=False),
    ]


def clip_vision_rules(cfg: CLIPVisionConfig, prefix: str = "") -> list[Rule]:
    """Key table of the vision tower (`{prefix}vision_model.*`, `{prefix}visual_projection`)."""
    v = f"{prefix}vision_model"
    return [
        Rule(f"{v}.embeddings.class_embedding", "embeddings/class_embedding"),
        *conv(f"{v}.embeddings.patch_embedding", "embeddings/patch_embedding", bias=False),
        *embedding(f"{v}.embeddings.position_embedding", "embeddings/position_embedding"),
        *norm(f"{v}.pre_layrnorm", "pre_layrnorm"),
        *_encoder_rules(v, cfg.num_hidden_layers),
        *norm(f"{v}.post_layernorm", "post_layernorm"),
        *linear(f"{prefix}visual_projection", "visual_projection", bias=False),
    ]


def _under(state: StateDict, prefix: str) -> StateDict:
    # A prefix names one component of a multi-component file (VD's old checkpoint holds the
    # diffuser, both VAEs and CLIP): only the keys under it are this loader's business.
    return state.without(f"(?!{re.escape(prefix)}).*") if prefix else state


def load_clip_text(
    state: StateDict,
    cfg: CLIPTextConfig,
    *,
    prefix: str = "",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Loads `CLIPTextEncoder` params from a transformers state dict.

    Args:
      state: a `CLIPTextModelWithProjection` or full `CLIPModel` state dict (keys of
        the vision tower and `logit_scale` are ignored).
      cfg: the text config (`CLIPTextConfig.from_hf`).
      prefix: put in front of every transformers key ("clip.model." for VD's old
        checkpoint); keys outside the prefix are not looked at.
      dtype: compute dtype of the model the params are for (does not change them).
      param_dtype: dtype of the returned arrays.

    Returns:
      Nested dict of numpy arrays for `CLIPTextEncoder(cfg).apply({"params": ...})`.

    Raises:
      CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    model = CLIPTextEncoder(cfg, dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)
    target = core.abstract_params(model.init, jax.random.key(0), ids)
    return core.load_params(
        _under(state, prefix),
        clip_text_rules(cfg, prefix),
        target,
        ignore=clip_ignore("text", prefix),
        what="CLIP text tower",
    )


def load_clip_vision(
    state: StateDict,
    cfg: CLIPVisionConfig,
    *,
    prefix: str = "",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Loads `CLIPVisionEncoder` params from a transformers state dict.

    Args:
      state: a `CLIPVisionModelWithProjection` or full `CLIPModel` state dict (keys of
        the text tower and `logit_scale` are ignored).
      cfg: the vision config (`CLIPVisionConfig.from_hf`).
      prefix: put in front of every transformers key ("clip.model." for VD's old
        checkpoint); keys outside the prefix are not looked at.
      dtype: compute dtype of the model the params are for (does not change them).
      param_dtype: dtype of the returned arrays.

    Returns:
      Nested dict of numpy arrays for `CLIPVisionEncoder(cfg).apply({"params": ...})`.

    Raises:
      CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    model = CLIPVisionEncoder(cfg, dtype=dtype, param_dtype=param_dtype)
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    target = core.abstract_params(model.init, jax.random.key(0), pixels)
    return core.load_params(
        _under(state, prefix),
        clip_vision_rules(cfg, prefix),
        target,
        ignore=clip_ignore("vision", prefix),
        what="CLIP vision tower",
    )
