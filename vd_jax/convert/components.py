"""What every reader of VD weights returns (`VDModels`) and the files they share.

`VDModels` holds the configs and numpy params of everything a set of flows needs; the readers
of diffusers folders (`diffusers_folder`) and of the released original files
(`original_files`) both fill it, and `load.load_models` picks between them. Both readers
open JSON files and component weights with `read_json` / `component_state_dict` and put CLIP
towers in with `add_clip_tower`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

from vd_jax.convert import core
from vd_jax.convert.clip import load_clip_tower
from vd_jax.convert.core import CheckpointError
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vd_jax.models.unet import DiffuserConfig
from vd_jax.models.vae import VAEConfig
from vd_jax.processing.images import CLIPImageProcessorConfig

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclasses.dataclass
class VDModels:
    """Configs and Flax params of everything a set of flows needs (None where not loaded)."""

    flows: tuple[str, ...]
    schedule: NoiseSchedule
    diffuser_config: DiffuserConfig
    diffuser_params: dict
    vae_config: VAEConfig
    vae_params: dict
    text_config: CLIPTextConfig | None = None
    text_params: dict | None = None
    tokenizer: Any = None
    vision_config: CLIPVisionConfig | None = None
    vision_params: dict | None = None
    image_processor: CLIPImageProcessorConfig | None = None
    image_sample_size: int | None = None  # the image U-Net's default latent size
    squash_images_to: int | None = None  # resize inputs to this square first (original app)
    optimus_configs: tuple | None = None  # (BertConfig, GPT2Config)
    optimus_params: dict | None = None  # {"encoder": ..., "decoder": ...}, as the flows need
    bert_tokenizer: Any = None
    gpt2_tokenizer: Any = None
    optimus_lowercase: bool = True  # the original lower-cases text before its cased BERT
    # Diffuser text latents = Optimus means x this (1 / their std when a run trained its own
    # Optimus, as the demo does; VD's released model uses the means as they are).
    text_latent_scale: float = 1.0
    # Image-context tokens the diffuser reads: the first N of CLIP's (None: all, VD's;
    # 1: the CLS token alone, the demo's).
    image_context_tokens: int | None = None
    # The unconditional image context the model was trained with, when known ("zeros" for
    # vd_jax runs); None leaves each flow's default (diffusers' gray image, the app's black).
    image_uncond: str | None = None
    source: str = ""  # where the weights came from, for logs and run.json


def has_part(params: Mapping[str, Any] | None, part: str) -> bool:
    """Whether diffuser params hold the (non-empty) part 'global', 'data/image', ..."""
    node: Any = params or {}
    for key in part.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return bool(node)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def component_state_dict(folder: str, component: str) -> core.StateDict:
    """Opens the weights of one component sub-folder (single file, or sharded with an index)."""
    sub = os.path.join(folder, component)
    if not os.path.isdir(sub):
        raise CheckpointError(f"{folder}: component folder {component}/ is missing")
    indexes = sorted(glob.glob(os.path.join(sub, "*.safetensors.index.json")))
    indexes += sorted(glob.glob(os.path.join(sub, "*.bin.index.json")))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise CheckpointError(f"{indexes[0]}: index lists no shards")
        return core.merge(*(core.read_state_dict(os.path.join(sub, s)) for s in shards))
    for name in _WEIGHT_NAMES:
        path = os.path.join(sub, name)
        if os.path.isfile(path):
            return core.read_state_dict(path)
    variants = sorted(
        glob.glob(os.path.join(sub, "*.safetensors")) + glob.glob(os.path.join(sub, "*.bin"))
    )
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return core.read_state_dict(variants[0])
    raise CheckpointError(
        f"{sub}: no weights file (looked for {', '.join(_WEIGHT_NAMES)}"
        + (f"; found several candidates {variants}" if variants else "")
        + ")"
    )


def add_clip_tower(
    models: VDModels,
    cfg: CLIPTextConfig | CLIPVisionConfig,
    state: core.StateDict,
    *,
    prefix: str = "",
    param_dtype: Any,
) -> None:
    """Loads the CLIP tower `cfg` configures (text or vision) and puts it into `models`.

    Args:
      models: gets `text_config` / `text_params` or `vision_config` / `vision_params`.
      cfg: the tower's config; its type says which tower.
      state: the tower's weights (a full `CLIPModel` state dict serves both towers).
      prefix: of the CLIP keys in `state` (see `clip.load_clip_tower`).
      param_dtype: dtype of the loaded params.
    """
    params = load_clip_tower(state, cfg, prefix=prefix, param_dtype=param_dtype)
    if isinstance(cfg, CLIPTextConfig):
        models.text_config, models.text_params = cfg, params
    else:
        models.vision_config, models.vision_params = cfg, params
