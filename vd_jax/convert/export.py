"""Flax params -> a diffusers-format Versatile Diffusion folder (`export_diffusers`).

The inverse of `diffusers_folder.load_diffusers_folder`: every component's tensors go back
through the key table its reader uses (`core.export_state`), every config through the
inverse of its parser, so reading the folder back gives the same configs and bit-identical
params, and diffusers' `VersatileDiffusion*Pipeline.from_pretrained` loads it. The writer for
SHI-Labs' original file set (`export_original`) lives in export_original.py and shares the
helpers here: the atomic folder, safetensors files, and the diffuser completeness rules.

Nothing needs PyTorch: tensors are written with `safetensors.numpy`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from vd_jax.convert import core
from vd_jax.convert import unet as unet_convert
from vd_jax.convert.clip import export_clip_tower
from vd_jax.convert.components import VDModels, has_part
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.vae import vae_rules
from vd_jax.models import unet as unet_model
from vd_jax.processing.images import CLIPImageProcessorConfig

log = logging.getLogger(__name__)

# The diffusers release the written configs were checked against; configs carry a version,
# and writing a fixed one keeps the output independent of what happens to be installed.
DIFFUSERS_VERSION = "0.42.1"

MODEL_INDEX = {
    "_class_name": "VersatileDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    # diffusers exports VD's flat U-Net from no package it loads components from: only the
    # full module path (imported with any VD pipeline) resolves. save_pretrained's "diffusers"
    # and the published folder's "versatile_diffusion" do not load with current diffusers.
    "text_unet": [
        "diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet",
        "UNetFlatConditionModel",
    ],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "vae": ["diffusers", "AutoencoderKL"],
}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

# --------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def atomic_folder(output: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """A temporary sibling of `output` to write into, renamed to `output` on success.

    Readers never see a half-written folder: an exception removes the temporary one and
    leaves `output` as it was.

    Args:
      output: the folder to create.
      overwrite: replace an existing non-empty `output` (else that is a `CheckpointError`).
    """
    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and not os.path.isdir(output):
        raise CheckpointError(f"{output}: exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise CheckpointError(
            f"{output}: folder exists and is not empty (overwrite=True replaces it)"
        )
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        _swap_in(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: str, output: str) -> None:
    """Renames `tmp` to `output`, replacing (only once `tmp` is in place) what was there."""
    if not os.path.isdir(output):
        os.rename(tmp, output)
        return
    parent, name = os.path.split(output)
    aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(output, os.path.join(aside, name))
    try:
        os.rename(tmp, output)
    except OSError:
        os.rename(os.path.join(aside, name), output)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def write_json(path: str, data: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_safetensors(path: str, state: Mapping[str, np.ndarray]) -> None:
    """A safetensors file; metadata {"format": "pt"} is what transformers asks of one."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # np.require, not np.ascontiguousarray, which turns 0-d tensors (logit_scale) into 1-d.
    tensors = {k: np.require(v, requirements="C") for k, v in state.items()}
    save_file(tensors, path, {"format": "pt"})


def complete_diffuser_params(models: VDModels, what: str, warnings: list[str]) -> dict[str, Any]:
    """`models.diffuser_params` with every part, or `CheckpointError` naming the missing ones.

    The text data layers are the one part a source may lack (a folder read for image flows
    only): they are filled with zeros, and a warning saying so goes to `warnings`.

    Args:
      models: the source.
      what: how the output names the text data layers, for the warning.
      warnings: gets the warning.
    """
    params = models.diffuser_params or {}
    missing = [p for p in unet_model.ALL_PARTS if not has_part(params, p)]
    fatal = [p for p in missing if p != "data/text"]
    if fatal:
        raise CheckpointError(
            f"cannot export: the diffuser parts {fatal} are not in the source (load it with "
            "flows=None to read everything it holds)"
        )
    if not missing:
        return dict(params)
    warnings.append(
        f"{what} are not in the source: written as zeros, the export's text flows are not usable"
    )
    abstract = unet_model.abstract_params(models.diffuser_config, ["data/text"])
    dtype = np.asarray(core.flatten(params)["global/linear_1/kernel"]).dtype
    zeros = {k: np.zeros(v.shape, dtype) for k, v in core.flatten(abstract).items()}
    return {**params, "data": {**params["data"], **core.unflatten(zeros)["data"]}}


def require_clip(models: VDModels, layout: str) -> None:
    absent = [
        name
        for name, cfg, params in (
            ("text", models.text_config, models.text_params),
            ("vision", models.vision_config, models.vision_params),
        )
        if cfg is None or params is None
    ]
    if absent:
        raise CheckpointError(
            f"cannot export to the {layout} layout: the CLIP {' and '.join(absent)} tower(s) "
            "are not in the source (load it with flows=None to read everything it holds)"
        )


def unstored_settings_warnings(models: VDModels, reader: str) -> list[str]:
    """Warnings for the settings of `models` that neither written layout has a place for."""
    out = []
    tokens = getattr(models, "image_context_tokens", None)
    if tokens is not None:
        out.append(
            f"image_context_tokens={tokens} is not stored: {reader} read every image token of "
            f"CLIP, not the first {tokens}"
        )
    uncond = getattr(models, "image_uncond", None)
    if uncond not in (None, "gray"):
        out.append(
            f"image_uncond={uncond!r} is not stored: {reader} use their own unconditional "
            "image context"
        )
    return out


# --------------------------------------------------------------------------- diffusers


def _diffusers_warnings(models: VDModels) -> list[str]:
    out = []
    scale = float(getattr(models, "text_latent_scale", 1.0))
    note = f" (nor for its text_latent_scale={scale:g})" if scale != 1.0 else ""
    if models.optimus_params is not None:
        out.append(f"Optimus text VAE left out: diffusers has no place for it{note}")
    elif note:
        out.append(f"text_latent_scale={scale:g} left out: diffusers has no place for it")
    return out + unstored_settings_warnings(models, "diffusers' pipelines")


def _unet_states(models: VDModels, params: Any, dtype: Any) -> tuple[dict, dict]:
    """image_unet's and text_unet's state dicts; text_unet gets its copy of the time MLP."""
    config = models.diffuser_config
    state = core.export_state(
        unet_convert.diffusers_rules(config), params, dtype, what="the VD diffuser"
    )
    for text_key, image_key in unet_convert.text_unet_time_embedding_keys(config).items():
        state[text_key] = state[image_key]
    split: tuple[dict, dict] = ({}, {})
    for key, value in state.items():
        for i, prefix in enumerate((unet_convert.IMAGE_PREFIX, unet_convert.TEXT_PREFIX)):
            if key.startswith(prefix):
                split[i][key[len(prefix) :]] = value
    return split


def _diffusers_files(models: VDModels, dtype: Any, warnings: list[str]) -> dict[str, Any]:
    """{relative path: state dict or config dict} of every file but the tokenizer's."""
    params = complete_diffuser_params(models, "text_unet's text data layers", warnings)
    image_state, text_state = _unet_states(models, params, dtype)
    try:
        image_cfg, text_cfg = unet_convert.diffusers_configs(
            models.diffuser_config, models.image_sample_size
        )
    except ValueError as e:
        raise CheckpointError(f"cannot export to diffusers: {e}") from None
    text_cfg_hf, vision_cfg_hf = models.text_config.to_hf(), models.vision_config.to_hf()
    size = models.vision_config.image_size
    processor = models.image_processor or CLIPImageProcessorConfig(
        size=size, crop_size=(size, size)
    )
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    return {
        "model_index.json": MODEL_INDEX,
        "image_unet/config.json": {**image_cfg, **version},
        f"image_unet/{DIFFUSERS_WEIGHTS}": image_state,
        "text_unet/config.json": {**text_cfg, **version},
        f"text_unet/{DIFFUSERS_WEIGHTS}": text_state,
        "vae/config.json": {**models.vae_config.to_diffusers(), **version},
        f"vae/{DIFFUSERS_WEIGHTS}": core.export_state(
            vae_rules(models.vae_config, "diffusers"), models.vae_params, dtype, what="the VAE"
        ),
        "text_encoder/config.json": text_cfg_hf,
        f"text_encoder/{TRANSFORMERS_WEIGHTS}": export_clip_tower(
            models.text_params, models.text_config, dtype=dtype
        ),
        "image_encoder/config.json": vision_cfg_hf,
        f"image_encoder/{TRANSFORMERS_WEIGHTS}": export_clip_tower(
            models.vision_params, models.vision_config, dtype=dtype
        ),
        "image_feature_extractor/preprocessor_config.json": processor.to_dict(),
        "scheduler/scheduler_config.json": {**models.schedule.to_scheduler_config(), **version},
    }


def write_clip_tokenizer(tokenizer: Any, directory: str) -> None:
    """The source's tokenizer files, or CLIP's standard BPE (VD's) when it has none."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
        return
    from vd_jax.processing.clip_tokenizer import write_clip_tokenizer_files

    log.info("no tokenizer in the source: writing CLIP's standard BPE tokenizer (VD's)")
    write_clip_tokenizer_files(directory)


def export_diffusers(
    models: VDModels,
    output: str | os.PathLike,
    *,
    dtype: Any = None,
    overwrite: bool = False,
) -> list[str]:
    """Writes `models` as a diffusers-format VD folder (what `VersatileDiffusionPipeline`
    `.save_pretrained` writes): model_index.json, image_unet/, text_unet/, vae/,
    text_encoder/, image_encoder/, tokenizer/, image_feature_extractor/, scheduler/.

    Args:
      models: what to write; needs every diffuser part but the text data layers (zeros
        then), and both CLIP towers (load the source with `flows=None`).
      output: the folder; it appears whole or not at all.
      dtype: of the written tensors (default: each param's own).
      overwrite: replace an existing non-empty `output`.

    Returns:
      Warnings about what the folder leaves out (also logged).

    Raises:
      CheckpointError: naming the parts or params the source lacks.
    """
    warnings: list[str] = []
    require_clip(models, "diffusers")
    files = _diffusers_files(models, dtype, warnings)
    warnings += _diffusers_warnings(models)
    with atomic_folder(output, overwrite) as tmp:
        for rel, content in files.items():
            path = os.path.join(tmp, rel)
            if rel.endswith(".json"):
                write_json(path, content)
            else:
                write_safetensors(path, content)
        write_clip_tokenizer(models.tokenizer, os.path.join(tmp, "tokenizer"))
    for w in warnings:
        log.warning("%s: %s", os.fspath(output), w)
    return warnings
