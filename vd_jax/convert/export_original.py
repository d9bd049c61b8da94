"""Flax params -> SHI-Labs' original Versatile Diffusion file set (`export_original`).

The inverse of `original_files.load_original_folder` for the files it reads first:

  vd-four-flow-v1-0-fp16.safetensors  the diffuser, new layout (`diffuser.*`), float16
  kl-f8.safetensors                   the image VAE, LDM names, float32
  optimus-vae.safetensors             the Optimus text VAE with its buffers, float32
  clip/                               a transformers CLIPModel folder (both towers)
  vd_config.json                      the sizes, in the original configs' layout

plus, with `pth`, the `.pth` twins of the three files as the released ones are stored
(`torch.save` of a plain dict of tensors, readable with `torch.load(weights_only=True)`).
Keys, shapes and dtypes are those of the released files; the shared helpers (atomic
folder, diffuser completeness) are in export.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Any

import numpy as np

from vd_jax.convert import core, unet_original
from vd_jax.convert.clip import LOGIT_SCALE, clip_model_config, export_clip_tower
from vd_jax.convert.components import VDModels
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.export import (
    TRANSFORMERS_WEIGHTS,
    atomic_folder,
    complete_diffuser_params,
    require_clip,
    unstored_settings_warnings,
    write_clip_tokenizer,
    write_json,
    write_safetensors,
)
from vd_jax.convert.optimus import export_optimus, optimus_config_dict
from vd_jax.convert.vae import vae_rules
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.optimus import fold_latent_scale
from vd_jax.processing.images import CLIPImageProcessorConfig

log = logging.getLogger(__name__)

DIFFUSER_FILE = "vd-four-flow-v1-0-fp16"
VAE_FILE = "kl-f8"
OPTIMUS_FILE = "optimus-vae"
CLIP_DIR = "clip"
# The scaling the original layout's reader assumes for the image latents (kl-f8's).
LDM_SCALING_FACTOR = 0.18215
_TEXT_FLOWS = "image_to_text, text_variation, i2t2i"


def _vd_config(models: VDModels) -> dict[str, Any]:
    """vd_config.json: the sizes in the original configs' layout, or `CheckpointError`."""
    problems = []
    try:
        image, text = unet_original.original_configs(models.diffuser_config)
    except ValueError as e:
        problems.append(str(e))
    try:
        vae = {**models.vae_config.to_ldm(), "embed_dim": models.vae_config.latent_channels}
    except ValueError as e:
        problems.append(f"{e} (the image VAE)")
    if models.vae_config.scaling_factor != LDM_SCALING_FACTOR:
        problems.append(
            f"the VAE's scaling_factor={models.vae_config.scaling_factor} (the original "
            f"layout's reader uses {LDM_SCALING_FACTOR})"
        )
    try:
        clip_model_config(models.text_config, models.vision_config)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise CheckpointError(
            "cannot export to the original layout:\n  " + "\n  ".join(problems)
            + "\n  (export_diffusers writes these models)"
        )  # fmt: skip
    config: dict[str, Any] = {
        "diffuser.image": image,
        "diffuser.text": text,
        "vae.image": vae,
        "ctx (CLIP)": {
            "text": models.text_config.to_hf(),
            "vision": models.vision_config.to_hf(),
            "projection_dim": models.text_config.projection_dim,
        },
    }
    if models.optimus_configs is not None:
        config["vae.text"] = optimus_config_dict(*models.optimus_configs)
    if models.image_sample_size is not None:
        config["sample_size"] = models.image_sample_size
    return config


def _check_read_back(folder: str, models: VDModels, with_optimus: bool) -> None:
    """The configs the original-layout reader gets from `folder` must be the source's."""
    from vd_jax.convert.original_files import _configs

    got = _configs(folder)
    want = {
        "diffuser": models.diffuser_config,
        "vae": models.vae_config,
        "clip_text": models.text_config,
        "clip_vision": models.vision_config,
    }
    if with_optimus:
        want["optimus"] = tuple(models.optimus_configs)
    if models.image_sample_size is not None:
        want["latent_size"] = models.image_sample_size
    # `attention` says how to compute, not what: the reader's default is as good.
    got["diffuser"] = dataclasses.replace(
        got["diffuser"], attention=models.diffuser_config.attention
    )
    wrong = [f"{k}: {want[k]} reads back as {got[k]}" for k in want if got[k] != want[k]]
    if wrong:
        raise CheckpointError(
            "cannot export to the original layout: vd_config.json would not read back to the "
            "source's configs:\n  " + "\n  ".join(wrong)
        )


def _optimus_state(models: VDModels, warnings: list[str]) -> dict[str, np.ndarray] | None:
    """optimus-vae's state dict, or None with a warning naming what the source lacks."""
    params = models.optimus_params or {}
    absent = [h for h in ("encoder", "decoder") if not params.get(h)]
    if absent or models.optimus_configs is None:
        what = "the Optimus text VAE" if len(absent) != 1 else f"Optimus' {absent[0]}"
        warnings.append(
            f"{what} is not in the source: {OPTIMUS_FILE} not written, the export's text "
            f"flows ({_TEXT_FLOWS}) are not usable"
        )
        return None
    scale = float(getattr(models, "text_latent_scale", 1.0))
    if scale != 1.0:
        # The layout has no field for the scale; folded into the weights, it needs none.
        log.info("folding text_latent_scale=%g into Optimus' latent head and projections", scale)
        params = fold_latent_scale(params, scale)
    return export_optimus(params, *models.optimus_configs)


def _settings_warnings(models: VDModels) -> list[str]:
    """What the original layout has no field for."""
    out = []
    if models.schedule != NoiseSchedule():
        out.append(
            "the source's noise schedule is not stored: the original layout's readers use VD's "
            f"(scaled-linear 0.00085..0.012); the source's is {models.schedule}"
        )
    size = models.vision_config.image_size
    standard = CLIPImageProcessorConfig(size=size, crop_size=(size, size))
    if models.image_processor is not None and models.image_processor != standard:
        out.append(
            "the source's CLIP image preprocessing is not stored: the original layout's readers "
            f"use CLIP's standard one at {size} px"
        )
    return out + unstored_settings_warnings(models, "the original layout's readers")


def _clip_state(models: VDModels) -> dict[str, np.ndarray]:
    """A CLIPModel state dict: both towers, their projections and the unused `logit_scale`."""
    return {
        **export_clip_tower(models.text_params, models.text_config, dtype=np.float32),
        **export_clip_tower(models.vision_params, models.vision_config, dtype=np.float32),
        "logit_scale": np.asarray(LOGIT_SCALE, np.float32),
    }


def save_pth(path: str, state: dict[str, np.ndarray]) -> None:
    """`torch.save` of a plain dict of tensors; keys holding the same array share a tensor
    (so its storage is written once, as in the released files)."""
    import torch

    tensors: dict[int, Any] = {}
    out = {}
    for key, value in state.items():
        if id(value) not in tensors:  # np.array: torch wants a writable buffer it can own
            tensors[id(value)] = torch.from_numpy(np.array(value))
        out[key] = tensors[id(value)]
    torch.save(out, path)


def export_original(
    models: VDModels,
    output: str | os.PathLike,
    *,
    pth: bool | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Writes `models` as SHI-Labs' original file set (see the module docstring).

    Args:
      models: what to write; needs every diffuser part but the text data layers (zeros
        then), both CLIP towers, and sizes the original configs can express (load the
        source with `flows=None`). Optimus is written when both halves are there, with a
        `text_latent_scale` other than 1 folded into its weights (the layout reads the
        means as they are).
      output: the folder; it appears whole or not at all.
      pth: also write the `.pth` twins (default: when PyTorch is importable).
      overwrite: replace an existing non-empty `output`.

    Returns:
      Warnings about what the folder leaves out (also logged).

    Raises:
      CheckpointError: naming the parts, params or sizes the layout cannot take.
    """
    warnings: list[str] = []
    require_clip(models, "original")
    config = _vd_config(models)
    params = complete_diffuser_params(
        models, "the text data layers (diffuser.text.data_blocks)", warnings
    )
    files = {
        DIFFUSER_FILE: core.export_state(
            unet_original.original_rules(models.diffuser_config, "new"),
            params,
            np.float16,
            what="the VD diffuser",
        ),
        VAE_FILE: core.export_state(
            vae_rules(models.vae_config, "ldm"), models.vae_params, np.float32, what="the VAE"
        ),
    }
    optimus = _optimus_state(models, warnings)
    if optimus is not None:
        files[OPTIMUS_FILE] = optimus
    else:
        config.pop("vae.text", None)
    warnings += _settings_warnings(models)
    if pth is None:
        pth = importlib.util.find_spec("torch") is not None
    with atomic_folder(output, overwrite) as tmp:
        write_json(os.path.join(tmp, "vd_config.json"), config)
        _check_read_back(tmp, models, with_optimus=optimus is not None)
        for stem, state in files.items():
            write_safetensors(os.path.join(tmp, f"{stem}.safetensors"), state)
            if pth:
                save_pth(os.path.join(tmp, f"{stem}.pth"), state)
        clip_dir = os.path.join(tmp, CLIP_DIR)
        write_json(
            os.path.join(clip_dir, "config.json"),
            clip_model_config(models.text_config, models.vision_config),
        )
        write_safetensors(os.path.join(clip_dir, TRANSFORMERS_WEIGHTS), _clip_state(models))
        write_clip_tokenizer(models.tokenizer, clip_dir)
    for w in warnings:
        log.warning("%s: %s", os.fspath(output), w)
    return warnings
