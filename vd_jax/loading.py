"""Loading a diffusers-format Versatile Diffusion folder into Flax params.

The folder is what `VersatileDiffusionPipeline.save_pretrained` writes (and what
the published weights look like): model_index.json, image_unet/, text_unet/,
vae/, text_encoder/, image_encoder/, tokenizer/, image_feature_extractor/,
scheduler/. Only the components and diffuser parts the requested flows use are
read: text->image never touches the image encoder or the image-context layers.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vd_jax.convert import core
from vd_jax.convert import unet as unet_convert
from vd_jax.convert.clip import load_clip_text, load_clip_vision
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.vae import load_vae
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.image_processing import CLIPImageProcessorConfig
from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vd_jax.models.unet import DiffuserConfig
from vd_jax.models.vae import VAEConfig

log = logging.getLogger(__name__)

# Which diffuser parts and encoders each flow needs.
_ALL_PARTS = ("global", "data/image", "data/text", "context/image", "context/text")
_IMAGE_DUAL = ("global", "data/image", "context/image", "context/text")
FLOW_NEEDS: dict[str, dict[str, Any]] = {
    "text_to_image": dict(parts=("global", "data/image", "context/text"), text=True, image=False),
    "image_variation": dict(
        parts=("global", "data/image", "context/image"), text=False, image=True
    ),
    "dual_guided": dict(parts=_IMAGE_DUAL, text=True, image=True),
    "multi_context": dict(parts=_IMAGE_DUAL, text=True, image=True),
    "image_to_text": dict(
        parts=("global", "data/text", "context/image"), text=False, image=True, optimus=("decoder",)
    ),
    "text_variation": dict(
        parts=("global", "data/text", "context/text"), text=True, image=False, optimus=("decoder",)
    ),
    "i2t2i": dict(parts=_ALL_PARTS, text=True, image=True, optimus=("encoder", "decoder")),
}
IMAGE_FLOWS = ("text_to_image", "image_variation", "dual_guided")

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


def _check_flows(flows: Sequence[str]) -> tuple[str, ...]:
    flows = tuple(flows)
    bad = [f for f in flows if f not in FLOW_NEEDS]
    if bad or not flows:
        raise ValueError(f"unknown flow(s) {bad or flows}; choose from {sorted(FLOW_NEEDS)}")
    return flows


def load_diffusers_folder(
    folder: str | os.PathLike,
    flows: Sequence[str] = IMAGE_FLOWS,
    *,
    param_dtype: Any = jnp.float32,
) -> VDModels:
    """Reads a diffusers VD folder; raises `CheckpointError` naming every problem.

    Args:
      folder: the pipeline folder (model_index.json at its top).
      flows: the flows to prepare; decides which components and parts are read.
      param_dtype: storage dtype of the returned params.

    Returns:
      `VDModels` with numpy params (put them on devices with `jax.device_put`).
    """
    folder = os.fspath(folder)
    flows = _check_flows(flows)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    text_only = [f for f in flows if FLOW_NEEDS[f].get("optimus")]
    if text_only:
        raise CheckpointError(
            f"{folder}: a diffusers folder has no Optimus text VAE, so {text_only} cannot run; "
            "point `weights` at the released original files (optimus-vae.pth, ...) instead"
        )
    index = read_json(os.path.join(folder, "model_index.json"))
    needs_text = any(FLOW_NEEDS[f]["text"] for f in flows)
    needs_image = any(FLOW_NEEDS[f]["image"] for f in flows)
    parts = tuple(sorted({p for f in flows for p in FLOW_NEEDS[f]["parts"]}))
    required = ["image_unet", "vae", "scheduler"] + (
        ["text_unet"] if "context/text" in parts else []
    )
    required += ["text_encoder", "tokenizer"] if needs_text else []
    required += ["image_encoder", "image_feature_extractor"] if needs_image else []
    absent = [c for c in required if c not in index]
    if absent:
        raise CheckpointError(f"{folder}/model_index.json lists no {absent} (needed for {flows})")

    sched_cfg = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    if sched_cfg.get("_class_name") not in (None, "DDIMScheduler"):
        log.info("sampling with DDIM on the betas of the folder's %s", sched_cfg.get("_class_name"))
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)

    image_unet_cfg = read_json(os.path.join(folder, "image_unet", "config.json"))
    text_unet_cfg = None
    if "text_unet" in index and os.path.isdir(os.path.join(folder, "text_unet")):
        text_unet_cfg = read_json(os.path.join(folder, "text_unet", "config.json"))
    diffuser_config = DiffuserConfig.from_diffusers(image_unet_cfg, text_unet_cfg)
    states = [component_state_dict(folder, "image_unet").prefixed("image_unet.")]
    if "context/text" in parts:
        states.append(component_state_dict(folder, "text_unet").prefixed("text_unet."))
    diffuser_params = unet_convert.load_diffuser(
        core.merge(*states), diffuser_config, parts=parts, param_dtype=param_dtype
    )

    vae_config = VAEConfig.from_diffusers(read_json(os.path.join(folder, "vae", "config.json")))
    vae_params = load_vae(component_state_dict(folder, "vae"), vae_config, param_dtype=param_dtype)

    models = VDModels(
        flows=flows,
        schedule=schedule,
        diffuser_config=diffuser_config,
        diffuser_params=diffuser_params,
        vae_config=vae_config,
        vae_params=vae_params,
        image_sample_size=image_unet_cfg.get("sample_size"),
    )
    if needs_text:
        from vd_jax.tokenizers import load_clip_tokenizer

        models.text_config = CLIPTextConfig.from_hf(
            read_json(os.path.join(folder, "text_encoder", "config.json"))
        )
        models.text_params = load_clip_text(
            component_state_dict(folder, "text_encoder"),
            models.text_config,
            param_dtype=param_dtype,
        )
        models.tokenizer = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
    if needs_image:
        models.vision_config = CLIPVisionConfig.from_hf(
            read_json(os.path.join(folder, "image_encoder", "config.json"))
        )
        models.vision_params = load_clip_vision(
            component_state_dict(folder, "image_encoder"),
            models.vision_config,
            param_dtype=param_dtype,
        )
        proc = os.path.join(folder, "image_feature_extractor", "preprocessor_config.json")
        read_json(proc)  # a clear error if absent or broken
        models.image_processor = CLIPImageProcessorConfig.from_json_file(proc)
    return models


def load_models(
    folder: str | os.PathLike, flows: Sequence[str], *, param_dtype: Any = jnp.float32
) -> VDModels:
    """Loads what `flows` need from a diffusers-format folder or a folder of SHI-Labs'
    released files (`vd-four-flow-v1-0-fp16.pth`, `kl-f8.pth`, `optimus-vae.pth`, ...)."""
    from vd_jax.loading_original import is_original_folder, load_original_folder

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return load_diffusers_folder(folder, flows, param_dtype=param_dtype)
    if is_original_folder(folder):
        return load_original_folder(folder, flows, param_dtype=param_dtype)
    raise CheckpointError(
        f"{folder}: neither a diffusers folder (model_index.json) nor a folder of the released "
        "original files (vd-four-flow-v1-0-fp16.pth / vd-four-flow-v1-0.pth, kl-f8.pth, "
        "optimus-vae.pth)"
    )


def param_count(params: Any) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
