"""Loading a diffusers-format Versatile Diffusion folder into Flax params.

The folder is what `VersatileDiffusionPipeline.save_pretrained` writes (and what
the published weights look like): model_index.json, image_unet/, text_unet/,
vae/, text_encoder/, image_encoder/, tokenizer/, image_feature_extractor/,
scheduler/. Only the components and diffuser parts the requested flows use are
read: text->image never touches the image encoder or the image-context layers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from vd_jax import flows as vd_flows
from vd_jax.convert import core
from vd_jax.convert import unet as unet_convert
from vd_jax.convert.components import VDModels, add_clip_tower, component_state_dict, read_json
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.vae import load_vae
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vd_jax.models.unet import DiffuserConfig
from vd_jax.models.vae import VAEConfig
from vd_jax.processing.images import CLIPImageProcessorConfig

log = logging.getLogger(__name__)


def load_diffusers_folder(
    folder: str | os.PathLike,
    flows: Sequence[str] | None = vd_flows.IMAGE_FLOWS,
    *,
    param_dtype: Any = jnp.float32,
) -> VDModels:
    """Reads a diffusers VD folder; raises `CheckpointError` naming every problem.

    Args:
      folder: the pipeline folder (model_index.json at its top).
      flows: the flows to prepare; decides which components and parts are read. None:
        everything the folder holds (the image flows, and every diffuser part, text_unet's
        text data layers included, as an export needs).
      param_dtype: storage dtype of the returned params.

    Returns:
      `VDModels` with numpy params (put them on devices with `jax.device_put`).
    """
    folder = os.fspath(folder)
    everything = flows is None
    flows = vd_flows.check(vd_flows.IMAGE_FLOWS if everything else flows)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    needs_text = any(vd_flows.get(f).needs_clip_text for f in flows)
    needs_image = any(vd_flows.get(f).needs_clip_vision for f in flows)
    parts = tuple(sorted(vd_flows.parts(flows)))
    if everything:
        parts = tuple(sorted({*parts, "data/text"}))
    index = _read_index(folder, flows, parts, needs_text, needs_image)
    schedule = _read_schedule(folder)
    image_unet_cfg = read_json(os.path.join(folder, "image_unet", "config.json"))
    diffuser_config = _diffuser_config(folder, index, image_unet_cfg)
    diffuser_params = _load_diffuser(folder, diffuser_config, parts, param_dtype)
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
        from vd_jax.processing.clip_tokenizer import load_clip_tokenizer

        cfg = CLIPTextConfig.from_hf(_component_config(folder, "text_encoder"))
        state = component_state_dict(folder, "text_encoder")
        add_clip_tower(models, cfg, state, param_dtype=param_dtype)
        models.tokenizer = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
    if needs_image:
        cfg = CLIPVisionConfig.from_hf(_component_config(folder, "image_encoder"))
        state = component_state_dict(folder, "image_encoder")
        add_clip_tower(models, cfg, state, param_dtype=param_dtype)
        proc = os.path.join(folder, "image_feature_extractor", "preprocessor_config.json")
        read_json(proc)  # a clear error if absent or broken
        models.image_processor = CLIPImageProcessorConfig.from_json_file(proc)
    return models


def describe(folder: str) -> tuple[DiffuserConfig, NoiseSchedule, tuple[str, ...], int, int]:
    """(diffuser config, schedule, flows, latent size, VAE factor) from the configs alone."""
    index = read_json(os.path.join(folder, "model_index.json"))
    image_unet_cfg = read_json(os.path.join(folder, "image_unet", "config.json"))
    vae_config = VAEConfig.from_diffusers(read_json(os.path.join(folder, "vae", "config.json")))
    latent = int(image_unet_cfg.get("sample_size") or 64)
    return (
        _diffuser_config(folder, index, image_unet_cfg),
        _read_schedule(folder),
        vd_flows.IMAGE_FLOWS,
        latent,
        vae_config.downsampling_factor,
    )


def _component_config(folder: str, component: str) -> dict:
    return read_json(os.path.join(folder, component, "config.json"))


def _read_index(
    folder: str, flows: tuple[str, ...], parts: tuple[str, ...], needs_text: bool, needs_image: bool
) -> dict:
    """model_index.json, once it is clear that it lists every component the flows need."""
    text_only = [f for f in flows if vd_flows.get(f).optimus]
    if text_only:
        raise CheckpointError(
            f"{folder}: a diffusers folder has no Optimus text VAE, so {text_only} cannot run; "
            "point `weights` at the released original files (optimus-vae.pth, ...) instead"
        )
    index = read_json(os.path.join(folder, "model_index.json"))
    required = ["image_unet", "vae", "scheduler"] + (
        ["text_unet"] if "context/text" in parts else []
    )
    required += ["text_encoder", "tokenizer"] if needs_text else []
    required += ["image_encoder", "image_feature_extractor"] if needs_image else []
    absent = [c for c in required if c not in index]
    if absent:
        raise CheckpointError(f"{folder}/model_index.json lists no {absent} (needed for {flows})")
    return index


def _read_schedule(folder: str) -> NoiseSchedule:
    sched_cfg = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    if sched_cfg.get("_class_name") not in (None, "DDIMScheduler"):
        log.info("sampling with DDIM on the betas of the folder's %s", sched_cfg.get("_class_name"))
    return NoiseSchedule.from_scheduler_config(sched_cfg)


def _diffuser_config(folder: str, index: dict, image_unet_cfg: dict) -> DiffuserConfig:
    text_unet_cfg = None
    # Read whenever the folder has it, not only when text_unet's weights are loaded: it sets
    # the config's text sizes (otherwise left at their defaults).
    if "text_unet" in index and os.path.isdir(os.path.join(folder, "text_unet")):
        text_unet_cfg = _component_config(folder, "text_unet")
    return unet_convert.diffuser_config_from_diffusers(image_unet_cfg, text_unet_cfg)


def _load_diffuser(
    folder: str, config: DiffuserConfig, parts: tuple[str, ...], param_dtype: Any
) -> dict:
    """The diffuser params of `parts`, from image_unet/ (and text_unet/ for the text context)."""
    states = [component_state_dict(folder, "image_unet").prefixed("image_unet.")]
    if "context/text" in parts:
        states.append(component_state_dict(folder, "text_unet").prefixed("text_unet."))
    return unet_convert.load_diffuser(
        core.merge(*states), config, parts=parts, param_dtype=param_dtype
    )
