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
from vd_jax.convert.core import Rule, StateDict, conv, embedding, linear, norm, repeated
from vd_jax.models.abstract import abstract_params
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


# One encoder layer of either tower, in transformers' module names.
_ENCODER_LAYER = (
    (linear, "self_attn.q_proj"),
    (linear, "self_attn.k_proj"),
    (linear, "self_attn.v_proj"),
    (linear, "self_attn.out_proj"),
    (norm, "layer_norm1"),
    (linear, "mlp.fc1"),
    (linear, "mlp.fc2"),
    (norm, "layer_norm2"),
)


def _encoder_rules(src: str, num_layers: int) -> list[Rule]:
    return repeated(f"{src}.encoder.layers", "encoder/layers", num_layers, _ENCODER_LAYER)


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


def load_clip_tower(
    state: StateDict,
    cfg: CLIPTextConfig | CLIPVisionConfig,
    *,
    prefix: str = "",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Loads the params of the CLIP tower `cfg` configures from a transformers state dict.

    Args:
      state: a `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection` or full
        `CLIPModel` state dict (keys of the other tower and `logit_scale` are ignored).
      cfg: `CLIPTextConfig` for a `CLIPTextEncoder`, `CLIPVisionConfig` for a
        `CLIPVisionEncoder` (`.from_hf` of the transformers config).
      prefix: put in front of every transformers key ("clip.model." for VD's old
        checkpoint); keys outside the prefix are not looked at, since there they name
        the other components of a multi-component file.
      dtype: compute dtype of the model the params are for (does not change them).
      param_dtype: dtype of the returned arrays.

    Returns:
      Nested dict of numpy arrays for `CLIPTextEncoder(cfg)` / `CLIPVisionEncoder(cfg)`
      `.apply({"params": ...})`.

    Raises:
      CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    if isinstance(cfg, CLIPTextConfig):
        tower, rules = "text", clip_text_rules(cfg, prefix)
        model = CLIPTextEncoder(cfg, dtype=dtype, param_dtype=param_dtype)
        example = jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)
    elif isinstance(cfg, CLIPVisionConfig):
        tower, rules = "vision", clip_vision_rules(cfg, prefix)
        model = CLIPVisionEncoder(cfg, dtype=dtype, param_dtype=param_dtype)
        shape = (1, cfg.image_size, cfg.image_size, cfg.num_channels)
        example = jnp.zeros(shape, jnp.float32)
    else:
        raise TypeError(f"cfg must be a CLIPTextConfig or CLIPVisionConfig, got {type(cfg)}")
    return core.load_params(
        state.under(prefix),
        rules,
        abstract_params(model.init, jax.random.key(0), example),
        ignore=clip_ignore(tower, prefix),
        what=f"CLIP {tower} tower",
    )


def load_clip_text(state: StateDict, cfg: CLIPTextConfig, **options: Any) -> dict[str, Any]:
    """`load_clip_tower` for the text tower: `CLIPTextEncoder` params."""
    return load_clip_tower(state, cfg, **options)


def load_clip_vision(state: StateDict, cfg: CLIPVisionConfig, **options: Any) -> dict[str, Any]:
    """`load_clip_tower` for the vision tower: `CLIPVisionEncoder` params."""
    return load_clip_tower(state, cfg, **options)


# --------------------------------------------------------------------------- writing

# transformers' initial `logit_scale`, ln(1 / 0.07): CLIPModel's contrastive temperature,
# which VD never uses but a CLIPModel file holds.
LOGIT_SCALE = 2.6592


def export_clip_tower(
    params: Any, cfg: CLIPTextConfig | CLIPVisionConfig, *, prefix: str = "", dtype: Any = None
) -> dict[str, Any]:
    """The transformers state dict of one tower's params (`load_clip_tower` inverted)."""
    if isinstance(cfg, CLIPTextConfig):
        tower, rules = "text", clip_text_rules(cfg, prefix)
    else:
        tower, rules = "vision", clip_vision_rules(cfg, prefix)
    return core.export_state(rules, params, dtype, what=f"CLIP {tower} tower")


def clip_model_config(text: CLIPTextConfig, vision: CLIPVisionConfig) -> dict[str, Any]:
    """A transformers `CLIPModel` `config.json` dict holding both towers.

    Raises:
      ValueError: when the towers project to different widths (a CLIPModel has one).
    """
    if text.projection_dim != vision.projection_dim:
        raise ValueError(
            f"the CLIP towers project to {text.projection_dim} and {vision.projection_dim}; "
            "a CLIPModel has one projection_dim"
        )
    strip = lambda d: {k: v for k, v in d.items() if k != "architectures"}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": strip(text.to_hf()),
        "vision_config": strip(vision.to_hf()),
        "projection_dim": text.projection_dim,
        "logit_scale_init_value": LOGIT_SCALE,
    }
