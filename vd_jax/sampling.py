"""`sample.py`'s logic: config -> loaded pipeline -> PNGs, samples.npy and run.json."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

import vd_jax
from vd_jax.loading import FLOW_NEEDS, load_diffusers_folder
from vd_jax.pipelines import IMAGE_UNCOND_MODES, VDPipeline, load_image

log = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A sampling config field that cannot work; the message names the field."""


def _split(value: str, sep: str) -> list[str]:
    return [v.strip() for v in value.split(sep) if v.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field, before anything is loaded."""
    if not config.weights:
        raise ConfigError("config.weights: give the diffusers-format VD folder to sample from")
    if config.flow not in FLOW_NEEDS:
        raise ConfigError(f"config.flow={config.flow!r}: choose one of {sorted(FLOW_NEEDS)}")
    if config.flow in ("text_to_image", "dual_guided") and not _split(config.prompt, "|"):
        raise ConfigError(f"config.prompt: the {config.flow} flow needs a prompt")
    if config.flow in ("image_variation", "dual_guided") and not _split(config.image, ","):
        raise ConfigError(f"config.image: the {config.flow} flow needs an image path")
    for field in ("num_steps", "num_samples"):
        if config[field] < 1:
            raise ConfigError(f"config.{field} must be >= 1, got {config[field]}")
    if config.dtype not in _DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: choose one of {sorted(_DTYPES)}")
    if config.image_uncond not in IMAGE_UNCOND_MODES:
        raise ConfigError(
            f"config.image_uncond={config.image_uncond!r}: one of {IMAGE_UNCOND_MODES}"
        )
    if config.init_noise and not os.path.isfile(config.init_noise):
        raise ConfigError(f"config.init_noise: {config.init_noise!r} does not exist")


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Samples one flow as the config says and writes its outputs; returns run.json's content."""
    validate(config)
    # Read every input before the slow load so a typo fails in a second.
    images = [load_image(p) for p in _split(config.image, ",")] if config.image else []
    prompts = _split(config.prompt, "|")
    init_noise = np.load(config.init_noise, allow_pickle=False) if config.init_noise else None

    t0 = time.perf_counter()
    models = load_diffusers_folder(config.weights, flows=(config.flow,))
    pipe = VDPipeline(models, dtype=_DTYPES[config.dtype])
    load_s = time.perf_counter() - t0

    kw = dict(
        num_samples=config.num_samples,
        num_steps=config.num_steps,
        guidance_scale=config.guidance_scale,
        eta=config.eta,
        seed=config.seed,
        init_noise=init_noise,
        height=config.height or None,
        width=config.width or None,
        show_progress=config.progress,
    )
    t0 = time.perf_counter()
    if config.flow == "text_to_image":
        result = pipe.text_to_image(prompts, **kw)
    elif config.flow == "image_variation":
        result = pipe.image_variation(images, image_uncond=config.image_uncond, **kw)
    else:
        result = pipe.dual_guided(
            prompts,
            images,
            text_strength=config.text_strength,
            image_uncond=config.image_uncond,
            **kw,
        )
    total_s = time.perf_counter() - t0

    os.makedirs(config.output_dir, exist_ok=True)
    pixels = np.clip(np.round(result.images * 255.0), 0, 255).astype(np.uint8)
    for i, img in enumerate(pixels):
        _write_atomic(
            os.path.join(config.output_dir, f"sample_{i:03d}.png"),
            lambda p, img=img: Image.fromarray(img).save(p, format="PNG"),
        )

    def save_npy(p):
        with open(p, "wb") as f:
            np.save(f, result.images.astype(np.float32))

    _write_atomic(os.path.join(config.output_dir, "samples.npy"), save_npy)
    record = {
        "config": config.to_dict(),
        "flow": config.flow,
        "seed": config.seed,
        "num_images": int(len(pixels)),
        "image_shape": list(result.images.shape[1:]),
        "timings": {
            "load_s": round(load_s, 4),
            "compile_s": round(result.compile_s, 4),
            "sample_s": round(total_s - result.compile_s, 4),
        },
        "backend": jax.default_backend(),
        "vd_jax_version": vd_jax.__version__,
    }

    def save_json(p):
        with open(p, "w") as f:
            json.dump(record, f, indent=2)

    _write_atomic(os.path.join(config.output_dir, "run.json"), save_json)
    log.info("wrote %d samples to %s", len(pixels), config.output_dir)
    return record
