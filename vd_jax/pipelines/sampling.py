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
from vd_jax import flows as vd_flows
from vd_jax.convert.load import load_models
from vd_jax.pipelines.vd_pipeline import IMAGE_UNCOND_MODES, VDPipeline, load_image

log = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A sampling config field that cannot work; the message names the field."""


def _split(value: str, sep: str) -> list[str]:
    return [v.strip() for v in value.split(sep) if v.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field, before anything is loaded."""
    if not config.weights:
        raise ConfigError(
            "config.weights: give a VD folder (diffusers format, the original files or a "
            "vd_jax run's workdir)"
        )
    if config.flow not in vd_flows.FLOWS:
        raise ConfigError(f"config.flow={config.flow!r}: choose one of {list(vd_flows.FLOWS)}")
    flow = vd_flows.FLOWS[config.flow]
    if flow.prompt and not _split(config.prompt, "|"):
        raise ConfigError(f"config.prompt: the {config.flow} flow needs a prompt")
    if flow.image and not _split(config.image, ","):
        raise ConfigError(f"config.image: the {config.flow} flow needs an image path")
    if config.flow == "i2t2i" and not (config.negative_prompt and config.positive_prompt):
        raise ConfigError("config.negative_prompt / positive_prompt: i2t2i needs both")
    for field in ("num_steps", "num_samples"):
        if config[field] < 1:
            raise ConfigError(f"config.{field} must be >= 1, got {config[field]}")
    if config.dtype not in _DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: choose one of {sorted(_DTYPES)}")
    if config.image_uncond and config.image_uncond not in IMAGE_UNCOND_MODES:
        raise ConfigError(
            f"config.image_uncond={config.image_uncond!r}: one of {IMAGE_UNCOND_MODES}"
        )
    if not 0.0 <= config.focus <= 1.0:
        raise ConfigError(f"config.focus must be in [0, 1], got {config.focus}")
    if not 0.0 <= config.fidelity < 1.0:
        raise ConfigError(f"config.fidelity must be in [0, 1), got {config.fidelity}")
    if config.init_noise and not os.path.isfile(config.init_noise):
        raise ConfigError(f"config.init_noise: {config.init_noise!r} does not exist")


def _floats(value: str, n: int, default: float, field: str) -> list[float]:
    if not value:
        return [default] * n
    try:
        out = [float(v) for v in value.split(",")]
    except ValueError:
        raise ConfigError(f"config.{field}={value!r}: expected numbers separated by ','") from None
    if len(out) != n:
        raise ConfigError(f"config.{field}: {len(out)} values for {n} images")
    return out


def _masks(value: str, n: int) -> list[np.ndarray | None] | None:
    if not value:
        return None
    paths = value.split(",")
    if len(paths) != n:
        raise ConfigError(f"config.image_masks: {len(paths)} entries for {n} images")
    return [
        np.asarray(load_image(p.strip()).convert("L"), np.float32) / 255 if p.strip() else None
        for p in paths
    ]


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _run_flow(pipe: VDPipeline, config, prompts, images, kw):
    flow = config.flow
    uncond = {"image_uncond": config.image_uncond} if config.image_uncond else {}
    decode = dict(
        method=config.text_decoding,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_length=config.max_text_tokens,
        num_beams=config.num_beams,
        remove_duplicates=config.remove_duplicate_words,
    )
    if flow == "text_to_image":
        return pipe.text_to_image(prompts, **kw)
    if flow == "image_variation":
        return pipe.image_variation(
            images,
            focus=config.focus,
            fidelity=config.fidelity,
            color_adjust=config.color_adjust,
            **uncond,
            **kw,
        )
    if flow == "dual_guided":
        return pipe.dual_guided(
            prompts, images, text_strength=config.text_strength, focus=config.focus, **uncond, **kw
        )
    if flow == "multi_context":
        n = len(images)
        return pipe.multi_context(
            images,
            weights=_floats(config.image_weights, n, 1.0, "image_weights"),
            focus=_floats(config.image_focus, n, 0.5, "image_focus"),
            masks=_masks(config.image_masks, n),
            prompt=" ".join(prompts),
            text_strength=config.text_strength if prompts else 0.0,
            **uncond,
            **kw,
        )
    if flow == "image_to_text":
        return pipe.image_to_text(images, decode=decode, **uncond, **kw)
    if flow == "text_variation":
        return pipe.text_variation(prompts, decode=decode, **kw)
    return pipe.i2t2i(
        images[0],
        negative=config.negative_prompt,
        positive=config.positive_prompt,
        decode=decode,
        **kw,
    )


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Samples one flow as the config says and writes its outputs; returns run.json's content.

    Writes sample_NNN.png + samples.npy (image flows) and texts.json (text flows),
    then run.json; each file appears whole (written aside, then renamed).
    """
    validate(config)
    # Read every input before the slow load so a typo fails in a second.
    images = [load_image(p) for p in _split(config.image, ",")] if config.image else []
    prompts = _split(config.prompt, "|")
    init_noise = np.load(config.init_noise, allow_pickle=False) if config.init_noise else None

    t0 = time.perf_counter()
    models = load_models(
        config.weights,
        flows=(config.flow,),
        checkpoint_step=config.checkpoint_step if config.checkpoint_step >= 0 else None,
        use_ema=config.use_ema,
    )
    log.info("loaded %s from %s", config.flow, models.source or config.weights)
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
    if config.flow == "i2t2i":
        kw.pop("num_samples")
    t0 = time.perf_counter()
    result = _run_flow(pipe, config, prompts, images, kw)
    total_s = time.perf_counter() - t0

    os.makedirs(config.output_dir, exist_ok=True)
    record: dict[str, Any] = {
        "config": config.to_dict(),
        "flow": config.flow,
        "seed": config.seed,
        "weights": models.source or config.weights,
    }
    record.update(_write_outputs(config.output_dir, config.flow, result))
    record.update(
        timings={
            "load_s": round(load_s, 4),
            "compile_s": round(result.compile_s, 4),
            "sample_s": round(total_s - result.compile_s, 4),
        },
        backend=jax.default_backend(),
        vd_jax_version=vd_jax.__version__,
    )
    _write_atomic(os.path.join(config.output_dir, "run.json"), lambda p: _dump_json(p, record))
    log.info("wrote %s outputs to %s", config.flow, config.output_dir)
    return record


def _write_outputs(output_dir: str, flow: str, result) -> dict[str, Any]:
    """sample_NNN.png + samples.npy (images) and texts.json (texts); what run.json records."""
    record: dict[str, Any] = {}
    if result.images is not None:
        pixels = np.clip(np.round(result.images * 255.0), 0, 255).astype(np.uint8)
        for i, img in enumerate(pixels):
            _write_atomic(
                os.path.join(output_dir, f"sample_{i:03d}.png"),
                lambda p, img=img: Image.fromarray(img).save(p, format="PNG"),
            )

        def save_npy(p):
            with open(p, "wb") as f:
                np.save(f, result.images.astype(np.float32))

        _write_atomic(os.path.join(output_dir, "samples.npy"), save_npy)
        record.update(num_images=int(len(pixels)), image_shape=list(result.images.shape[1:]))
    if result.texts is not None:
        _write_atomic(
            os.path.join(output_dir, "texts.json"),
            lambda p: _dump_json(p, {"flow": flow, "texts": result.texts}),
        )
        record["texts"] = result.texts
    return record


def _dump_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
