"""VD's image flows: text->image, image variation and dual-guided generation.

`VDPipeline` encodes the contexts with the Flax CLIP towers, then runs the whole
DDIM loop with classifier-free guidance (uncond and cond in one batch) and the
VAE decode inside one jitted function, compiled once per shape and cached.
Arithmetic follows diffusers' VersatileDiffusion pipelines, so the same initial
noise gives the same pixels.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vd_jax.diffusion import ddim
from vd_jax.image_processing import preprocess, unconditional_gray_image
from vd_jax.loading import VDModels
from vd_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder
from vd_jax.models.unet import VDDiffuser
from vd_jax.models.vae import AutoencoderKL, decode_latents

IMAGE_UNCOND_MODES = ("gray", "zeros")


@dataclasses.dataclass
class SampleResult:
    images: np.ndarray  # [N, H, W, 3] float32 in [0, 1]
    latents: np.ndarray  # [N, h, w, C] final latents (NHWC)
    compile_s: float  # 0 when the compiled sampler was cached
    sample_s: float


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class VDPipeline:
    """Samples the image flows from loaded `VDModels`.

    Args:
      models: from `vd_jax.loading.load_diffusers_folder`.
      dtype: compute dtype (float32 for parity; bfloat16 on accelerators).
    """

    def __init__(self, models: VDModels, dtype: Any = jnp.float32):
        self.models = models
        self.dtype = dtype
        self.diffuser = VDDiffuser(models.diffuser_config, dtype=dtype)
        self.vae = AutoencoderKL(models.vae_config, dtype=dtype)
        self.text_encoder = (
            CLIPTextEncoder(models.text_config, dtype=dtype) if models.text_config else None
        )
        self.image_encoder = (
            CLIPVisionEncoder(models.vision_config, dtype=dtype) if models.vision_config else None
        )
        put = lambda p: None if p is None else jax.device_put(p)
        self.diffuser_params = put(models.diffuser_params)
        self.vae_params = put(models.vae_params)
        self.text_params = put(models.text_params)
        self.vision_params = put(models.vision_params)
        self._encode_text = jax.jit(
            lambda p, ids: self.text_encoder.apply({"params": p}, ids, method="context")
        )
        self._encode_image = jax.jit(
            lambda p, px: self.image_encoder.apply({"params": p}, px, method="context")
        )
        self._compiled: dict[Any, Any] = {}

    # ------------------------------------------------------------------ contexts

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """CLIP-text contexts [B, 77, D]: every projected token / |projected EOS|."""
        if self.text_encoder is None:
            raise ValueError(
                "this pipeline was loaded without the text encoder (flows without text)"
            )
        tok = self.models.tokenizer
        ids = tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        return self._encode_text(self.text_params, jnp.asarray(ids, jnp.int32))

    def encode_images(self, images: Sequence[Any]) -> jax.Array:
        """CLIP-image contexts [B, 257, D]: every projected token / |projected CLS|."""
        if self.image_encoder is None:
            raise ValueError(
                "this pipeline was loaded without the image encoder (flows without images)"
            )
        pixels = preprocess(list(images), self.models.image_processor)
        return self._encode_image(self.vision_params, jnp.asarray(pixels, self.dtype))

    def unconditional_image_context(self, n: int, mode: str = "gray") -> jax.Array:
        """`gray`: CLIP of diffusers' mid-gray image; `zeros`: the original app's zero context."""
        if mode not in IMAGE_UNCOND_MODES:
            raise ValueError(f"image_uncond must be one of {IMAGE_UNCOND_MODES}, got {mode!r}")
        ctx = self.encode_images([unconditional_gray_image()])
        if mode == "zeros":
            ctx = jnp.zeros_like(ctx)
        return jnp.repeat(ctx, n, axis=0)

    # ------------------------------------------------------------------ sampling

    def latent_shape(self, n: int, height: int | None, width: int | None) -> tuple[int, ...]:
        f = self.models.vae_config.downsampling_factor
        default = (self.models.image_sample_size or 64) * f
        height, width = height or default, width or default
        mult = f * 2 ** (len(self.models.diffuser_config.channel_mult) - 1)
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % mult:
                raise ValueError(f"{name}={v} must be a positive multiple of {mult} for this model")
        return (n, height // f, width // f, self.models.diffuser_config.image_in_channels)

    def _sampler(self, ctypes: tuple[str, ...], guided: bool, eta: float, show_progress: bool):
        diffuser, vae, schedule = self.diffuser, self.vae, self.models.schedule

        def run(diffuser_params, vae_params, cond, uncond, ratios, x_init, tables, scale, rng):
            def model_fn(x, t):
                if not guided:
                    return diffuser.apply(
                        {"params": diffuser_params},
                        x,
                        t,
                        cond,
                        xtype="image",
                        ctypes=ctypes,
                        ratios=ratios,
                    )
                both = [jnp.concatenate([u, c]) for u, c in zip(uncond, cond, strict=True)]
                out = diffuser.apply(
                    {"params": diffuser_params},
                    jnp.concatenate([x, x]),
                    jnp.concatenate([t, t]),
                    both,
                    xtype="image",
                    ctypes=ctypes,
                    ratios=ratios,
                )
                eps_u, eps_c = jnp.split(out, 2)
                return ddim.classifier_free_guidance(eps_u, eps_c, scale)

            latents = ddim.sample_loop(
                model_fn, x_init, tables, schedule, eta=eta, rng=rng, show_progress=show_progress
            )
            return decode_latents(vae, vae_params, latents), latents

        return jax.jit(run)

    def generate(
        self,
        contexts: Sequence[jax.Array],
        uncond_contexts: Sequence[jax.Array],
        ctypes: Sequence[str],
        ratios: Sequence[float] | None = None,
        *,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        seed: int = 0,
        init_noise: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        show_progress: bool = True,
    ) -> SampleResult:
        """Samples images from prepared contexts (one batch row per output image).

        Args:
          contexts / uncond_contexts: per context type, [N, L, D] conditional and
            unconditional contexts (unconditional ones are unused when guidance_scale <= 1).
          ctypes: 'text' / 'image' per context.
          ratios: mixing weights per context (dual-guided); default equal.
          init_noise: optional initial latents in PyTorch layout [N, C, h, w].
        """
        ctypes = tuple(ctypes)
        n = contexts[0].shape[0]
        shape = self.latent_shape(n, height, width)
        if init_noise is not None:
            init_noise = np.asarray(init_noise, np.float32)
            want = (shape[0], shape[3], shape[1], shape[2])
            if init_noise.shape != want:
                raise ValueError(
                    f"init_noise has shape {init_noise.shape}; expected {want} ([N, C, H/f, W/f])"
                )
            x_init = jnp.asarray(init_noise.transpose(0, 2, 3, 1), self.dtype)
        else:
            x_init = jax.random.normal(jax.random.key(seed), shape, self.dtype)
        # DDIM's init_noise_sigma is 1: the noise is the starting latent as it is.
        ratios = jnp.asarray(ratios if ratios is not None else [1.0] * len(ctypes), jnp.float32)
        tables = ddim.ddim_tables(self.models.schedule, num_steps)
        guided = guidance_scale > 1.0
        args = (
            self.diffuser_params,
            self.vae_params,
            [jnp.asarray(c, self.dtype) for c in contexts],
            [jnp.asarray(c, self.dtype) for c in uncond_contexts] if guided else [],
            ratios,
            x_init,
            tables,
            jnp.float32(guidance_scale),
            jax.random.fold_in(jax.random.key(seed), 1),
        )
        shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args[2:]))
        key = (ctypes, guided, float(eta), show_progress, shapes)
        compile_s = 0.0
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = (
                self._sampler(ctypes, guided, float(eta), show_progress).lower(*args).compile()
            )
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ddim.progress(num_steps, disable=not show_progress):
            images, latents = self._compiled[key](*args)
            images = np.asarray(jax.block_until_ready(images), np.float32)
        return SampleResult(
            images, np.asarray(latents, np.float32), compile_s, time.perf_counter() - t0
        )

    # ------------------------------------------------------------------ flows

    def text_to_image(
        self, prompts: str | Sequence[str], *, num_samples: int = 1, **kw
    ) -> SampleResult:
        """Images from prompts: image data blocks + text-context blocks."""
        prompts = _as_list(prompts)
        cond = jnp.repeat(self.encode_prompts(prompts), num_samples, axis=0)
        uncond = self.encode_prompts([""] * len(cond))
        return self.generate([cond], [uncond], ("text",), **kw)

    def image_variation(
        self, images: Any, *, num_samples: int = 1, image_uncond: str = "gray", **kw
    ) -> SampleResult:
        """Variations of images: image data blocks + image-context blocks."""
        cond = jnp.repeat(self.encode_images(_as_list(images)), num_samples, axis=0)
        uncond = self.unconditional_image_context(len(cond), image_uncond)
        return self.generate([cond], [uncond], ("image",), **kw)

    def dual_guided(
        self,
        prompts: str | Sequence[str],
        images: Any,
        *,
        text_strength: float = 0.5,
        num_samples: int = 1,
        image_uncond: str = "gray",
        **kw,
    ) -> SampleResult:
        """Text and image together: the attention residuals mix with weights
        text_strength (text context) and 1 - text_strength (image context)."""
        prompts, images = _as_list(prompts), _as_list(images)
        if len(prompts) != len(images):
            if len(prompts) == 1:
                prompts = prompts * len(images)
            elif len(images) == 1:
                images = images * len(prompts)
            else:
                raise ValueError(f"dual_guided: {len(prompts)} prompts but {len(images)} images")
        if not 0.0 <= text_strength <= 1.0:
            raise ValueError(f"text_strength must be in [0, 1], got {text_strength}")
        text = jnp.repeat(self.encode_prompts(prompts), num_samples, axis=0)
        image = jnp.repeat(self.encode_images(images), num_samples, axis=0)
        uncond_text = self.encode_prompts([""] * len(text))
        uncond_image = self.unconditional_image_context(len(image), image_uncond)
        return self.generate(
            [text, image],
            [uncond_text, uncond_image],
            ("text", "image"),
            (text_strength, 1.0 - text_strength),
            **kw,
        )


def load_image(path: str) -> Image.Image:
    """An RGB PIL image from a path, with an error that names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path!r} does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None
