"""VD's flows on loaded models: the image flows, the text flows and the editing applications.

`VDPipeline` encodes contexts with the Flax CLIP towers, then runs the whole DDIM
loop with classifier-free guidance (uncond and cond in one batch) and, for
images, the VAE decode inside one jitted function, compiled once per shape and
cached. Text latents are decoded by the Optimus GPT-2 with a KV cache, also in
one jit. The image flows follow diffusers' VersatileDiffusion pipelines
arithmetic for arithmetic, so the same initial noise gives the same pixels; the
text flows and applications follow SHI-Labs' app (docs/original.md §6).
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

from vd_jax import xla_options
from vd_jax.convert.components import VDModels
from vd_jax.convert.load import load_models
from vd_jax.diffusion import ddim
from vd_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder
from vd_jax.models.optimus import OptimusVAE
from vd_jax.models.unet import VDDiffuser
from vd_jax.models.vae import AutoencoderKL, encode_images
from vd_jax.pipelines import applications as apps
from vd_jax.pipelines.sampler import initial_noise, make_sampler
from vd_jax.processing.images import preprocess, unconditional_gray_image

# Unconditional image contexts: CLIP of diffusers' gray image, the new app's zeros
# (variation, dual, blending) or CLIP of a black image (the app's image->text).
IMAGE_UNCOND_MODES = ("gray", "zeros", "black")


@dataclasses.dataclass
class SampleResult:
    latents: np.ndarray  # [N, h, w, C] image latents (NHWC) or [N, D] text latents
    compile_s: float  # 0 when the compiled sampler was cached
    sample_s: float
    images: np.ndarray | None = None  # [N, H, W, 3] float32 in [0, 1] (image flows)
    texts: list[str] | None = None  # decoded sentences (text flows)


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _pil(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


class VDPipeline:
    """Samples VD's flows from loaded `VDModels` (what was not loaded raises on use).

    Args:
      models: from `vd_jax.convert.load.load_models` (any supported folder).
      dtype: compute dtype (float32 for parity; bfloat16 on accelerators).

    `VDPipeline.from_pretrained(path)` loads and builds in one call.
    """

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        flows: Sequence[str] | None = None,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        checkpoint_step: int | None = None,
        use_ema: bool = True,
    ) -> VDPipeline:
        """A pipeline on the weights at `path`: a diffusers-format VD folder, a folder of
        SHI-Labs' released files, or a vd_jax run's workdir (local or a URL).

        Args:
          path: the folder.
          flows: the flows to load (others raise on use); None loads every one the source
            supports.
          dtype: compute dtype.
          param_dtype: storage dtype of the params (bfloat16 halves their memory).
          checkpoint_step: a run's checkpoint (default: its newest complete one).
          use_ema: a run's EMA params when it kept them.
        """
        models = load_models(
            path, flows, param_dtype=param_dtype, checkpoint_step=checkpoint_step,
            use_ema=use_ema,
        )  # fmt: skip
        return cls(models, dtype=dtype)

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
        self.params = jax.device_put(
            dict(
                diffuser=models.diffuser_params,
                vae=models.vae_params,
                text=models.text_params,
                vision=models.vision_params,
                optimus=models.optimus_params,
            )
        )
        self._encode_text = xla_options.jit(
            lambda p, ids: self.text_encoder.apply({"params": p}, ids, method="context")
        )
        self._encode_image = xla_options.jit(
            lambda p, px, w: self.image_encoder.apply({"params": p}, px, w, method="context")
        )
        self.text_vae = None  # image->text, text variation and I2T2I load Optimus
        if models.optimus_configs is not None:
            self.text_vae = OptimusVAE(
                models.optimus_configs,
                self.params["optimus"] or {},
                models.bert_tokenizer,
                models.gpt2_tokenizer,
                lowercase=models.optimus_lowercase,
                dtype=dtype,
            )
        self._compiled: dict[Any, Any] = {}

    def _need(self, what: str, present: Any) -> None:
        if present is None:
            raise ValueError(
                f"this pipeline was loaded without {what}: load it with a flow that uses it"
            )

    # ------------------------------------------------------------------ contexts

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """CLIP-text contexts [B, 77, D]: every projected token / |projected EOS|."""
        self._need("the CLIP text encoder", self.text_encoder)
        tok = self.models.tokenizer
        ids = tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        return self._encode_text(self.params["text"], jnp.asarray(ids, jnp.int32))

    def encode_images(self, images: Sequence[Any], masks: Sequence[Any] | None = None) -> jax.Array:
        """CLIP-image contexts [B, 1+N, D]: every projected token / |projected CLS|.

        `masks` (optional, one per image, [H, W] in [0, 1], 1 = keep) weight the tokens
        as VD's multi-context blender does.
        """
        self._need("the CLIP image encoder", self.image_encoder)
        images = list(images)
        if self.models.squash_images_to:
            # The original app squashes every input to 512x512 (no aspect kept) first;
            # float arrays (the unconditional gray image) are left to the processor.
            s = self.models.squash_images_to
            images = [
                _pil(i).convert("RGB").resize((s, s), Image.Resampling.BICUBIC)
                if isinstance(i, Image.Image) or np.asarray(i).dtype == np.uint8
                else i
                for i in images
            ]
        pixels = jnp.asarray(preprocess(images, self.models.image_processor), self.dtype)
        weights = None
        if masks is not None:
            cfg = self.models.vision_config
            weights = jnp.asarray(
                np.stack(
                    [apps.mask_token_weights(m, cfg.image_size, cfg.patch_size) for m in masks]
                )
            )
        ctx = self._encode_image(self.params["vision"], pixels, weights)
        # A model trained on the first N tokens (the demo's CLS alone) reads only those.
        return ctx[:, : self.models.image_context_tokens]

    def unconditional_image_context(self, n: int, mode: str | None = None) -> jax.Array:
        """The unconditional image context, `n` rows: `mode` or the model's own (see
        `VDModels.image_uncond`), else diffusers' gray image."""
        mode = self._uncond(mode, "gray")
        if mode not in IMAGE_UNCOND_MODES:
            raise ValueError(f"image_uncond must be one of {IMAGE_UNCOND_MODES}, got {mode!r}")
        if mode == "black":
            ctx = self.encode_images([np.zeros((512, 512, 3), np.uint8)])
        else:
            ctx = self.encode_images([unconditional_gray_image()])
            ctx = jnp.zeros_like(ctx) if mode == "zeros" else ctx
        return jnp.repeat(ctx, n, axis=0)

    def _uncond(self, mode: str | None, default: str) -> str:
        return mode or self.models.image_uncond or default

    def encode_text_latents(self, texts: Sequence[str]) -> jax.Array:
        """The diffuser's text latents [B, latent] of sentences: Optimus means (the encoder's
        mu) x the model's `text_latent_scale`."""
        self._need("the Optimus encoder", (self.params["optimus"] or {}).get("encoder"))
        return self.text_vae.encode(texts) * self.models.text_latent_scale

    def decode_text_latents(self, latents: jax.Array, **kw) -> list[str]:
        """Sentences from Optimus latents (`OptimusVAE.decode`'s options: seed, temperature,
        top_k, top_p, max_length, method, num_beams, remove_duplicates; the original:
        ancestral sampling, T=1, 30 tokens)."""
        self._need("the Optimus decoder", (self.params["optimus"] or {}).get("decoder"))
        return self.text_vae.decode(jnp.asarray(latents) / self.models.text_latent_scale, **kw)

    # ------------------------------------------------------------------ sampling

    def latent_shape(self, xtype: str, n: int, height: int | None, width: int | None) -> tuple:
        if xtype == "text":
            return (n, self.models.diffuser_config.text_dim)
        f = self.models.vae_config.downsampling_factor
        default = (self.models.image_sample_size or 64) * f
        height, width = height or default, width or default
        mult = f * 2 ** (len(self.models.diffuser_config.channel_mult) - 1)
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % mult:
                raise ValueError(f"{name}={v} must be a positive multiple of {mult} for this model")
        return (n, height // f, width // f, self.models.diffuser_config.image_in_channels)

    def generate(
        self,
        contexts: Sequence[jax.Array],
        uncond_contexts: Sequence[jax.Array],
        ctypes: Sequence[str],
        ratios: Sequence[float] | None = None,
        *,
        xtype: str = "image",
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        seed: int = 0,
        init_noise: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        start_latents: jax.Array | None = None,
        fidelity: float = 0.0,
        show_progress: bool = True,
    ) -> SampleResult:
        """Samples latents (and decodes images) from prepared contexts, one row per output.

        Args:
          contexts / uncond_contexts: per context, [N, L, D] conditional and unconditional
            contexts (the unconditional ones are unused when guidance_scale <= 1).
          ctypes: 'text' / 'image' per context (which context layers serve it).
          ratios: mixing weights per context (dual-guided); default equal.
          xtype: 'image' or 'text': which data layers run and what is produced.
          init_noise: optional initial noise, PyTorch layout ([N, C, h, w] or [N, D]).
          start_latents: with fidelity > 0, the input's latents to start from (SDEdit).
        """
        ctypes = tuple(ctypes)
        shape = self.latent_shape(xtype, contexts[0].shape[0], height, width)
        x_init = initial_noise(shape, xtype, seed, init_noise, self.dtype)
        tables = ddim.ddim_tables(self.models.schedule, num_steps)
        first_step = 0
        if fidelity > 0:
            if start_latents is None:
                raise ValueError("fidelity > 0 needs the input's latents (start_latents)")
            x_init, first_step = apps.sdedit_start(
                jnp.asarray(start_latents, self.dtype),
                x_init,
                tables,
                self.models.schedule.alphas_cumprod(),
                fidelity,
            )
        ratios = jnp.asarray(ratios if ratios is not None else [1.0] * len(ctypes), jnp.float32)
        guided = guidance_scale > 1.0
        args = (
            self.params,
            [jnp.asarray(c, self.dtype) for c in contexts],
            [jnp.asarray(c, self.dtype) for c in uncond_contexts] if guided else [],
            ratios,
            x_init,
            tables,
            jnp.float32(guidance_scale),
            jax.random.fold_in(jax.random.key(seed), 1),
        )
        static = (xtype, ctypes, guided, float(eta), first_step, show_progress)
        run, compile_s = self._compiled_sampler(static, args)
        t0 = time.perf_counter()
        with ddim.progress(num_steps - first_step, disable=not show_progress):
            images, latents = jax.block_until_ready(run(*args))
        return SampleResult(
            latents=np.asarray(latents, np.float32),
            compile_s=compile_s,
            sample_s=time.perf_counter() - t0,
            images=None if images is None else np.asarray(images, np.float32),
        )

    def _compiled_sampler(self, static: tuple, args: tuple):
        """(the sampler compiled for these static settings and shapes, seconds spent compiling
        it now: 0 when it was cached)."""
        shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args[1:]))
        if (static, shapes) in self._compiled:
            return self._compiled[static, shapes], 0.0
        t0 = time.perf_counter()
        fn = make_sampler(self.diffuser, self.vae, self.models.schedule, *static)
        self._compiled[static, shapes] = fn.lower(*args).compile()
        return self._compiled[static, shapes], time.perf_counter() - t0

    # ------------------------------------------------------------------ image flows

    def text_to_image(
        self, prompts: str | Sequence[str], *, num_samples: int = 1, **kw
    ) -> SampleResult:
        """Images from prompts: image data layers + text-context layers."""
        cond = jnp.repeat(self.encode_prompts(_as_list(prompts)), num_samples, axis=0)
        uncond = self.encode_prompts([""] * len(cond))
        return self.generate([cond], [uncond], ("text",), **kw)

    def image_variation(
        self,
        images: Any,
        *,
        num_samples: int = 1,
        image_uncond: str | None = None,
        focus: float = 0.5,
        fidelity: float = 0.0,
        color_adjust: bool = False,
        **kw,
    ) -> SampleResult:
        """Variations of images (image data + image-context layers), with VD's controls:
        focus (0 semantic, 0.5 neutral, 1 style), fidelity (0 free .. 1 the input) and
        the app's "simple" colour adjustment."""
        images = [_pil(i).convert("RGB") for i in _as_list(images)]
        cond = apps.apply_focus(self.encode_images(images), focus)
        cond = jnp.repeat(cond, num_samples, axis=0)
        uncond = self.unconditional_image_context(len(cond), image_uncond)
        start = None
        if fidelity > 0:
            start = jnp.repeat(self._image_latents(images, kw), num_samples, axis=0)
        result = self.generate(
            [cond], [uncond], ("image",), fidelity=fidelity, start_latents=start, **kw
        )
        if color_adjust:
            refs = np.repeat(
                np.stack([np.asarray(i, np.float32) / 255.0 for i in images]), num_samples, 0
            )
            result.images = np.stack(
                [
                    apps.color_adjust_simple(img[None], ref)[0]
                    for img, ref in zip(result.images, refs, strict=True)
                ]
            )
        return result

    def _image_latents(self, images: Sequence[Image.Image], kw: dict) -> jax.Array:
        """Scaled VAE latents of images resized to the output size (for fidelity)."""
        _, h, w, _ = self.latent_shape("image", 1, kw.get("height"), kw.get("width"))
        f = self.models.vae_config.downsampling_factor
        px = np.stack(
            [
                np.asarray(i.resize((w * f, h * f), Image.Resampling.BICUBIC), np.float32) / 255
                for i in images
            ]
        )
        # The original encodes with a posterior sample, not the mean.
        rng = jax.random.fold_in(jax.random.key(kw.get("seed", 0)), 3)
        return encode_images(self.vae, self.params["vae"], jnp.asarray(px, self.dtype), rng)

    def dual_guided(
        self,
        prompts: str | Sequence[str],
        images: Any,
        *,
        text_strength: float = 0.5,
        num_samples: int = 1,
        image_uncond: str | None = None,
        focus: float = 0.5,
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
        image = jnp.repeat(apps.apply_focus(self.encode_images(images), focus), num_samples, axis=0)
        uncond_text = self.encode_prompts([""] * len(text))
        uncond_image = self.unconditional_image_context(len(image), image_uncond)
        return self.generate(
            [text, image],
            [uncond_text, uncond_image],
            ("text", "image"),
            (text_strength, 1.0 - text_strength),
            **kw,
        )

    def multi_context(
        self,
        images: Sequence[Any],
        *,
        weights: Sequence[float] | None = None,
        focus: Sequence[float] | None = None,
        masks: Sequence[Any | None] | None = None,
        prompt: str = "",
        text_strength: float = 0.0,
        num_samples: int = 1,
        image_uncond: str | None = None,
        **kw,
    ) -> SampleResult:
        """VD's multi-context blender: each image's tokens (focus-adjusted, optionally
        masked, times its weight) are concatenated into one image context; a prompt,
        if given with text_strength > 0, mixes in with that ratio."""
        n = len(images)
        weights = list(weights) if weights is not None else [1.0] * n
        focus = list(focus) if focus is not None else [0.5] * n
        masks = list(masks) if masks is not None else [None] * n
        if not n or not len(weights) == len(focus) == len(masks) == n:
            raise ValueError("multi_context: give one weight, focus and mask (or None) per image")
        parts = []
        for img, w, lvl, m in zip(images, weights, focus, masks, strict=True):
            ctx = self.encode_images([img], None if m is None else [m])
            parts.append(apps.apply_focus(ctx, lvl) * w)
        image = jnp.repeat(jnp.concatenate(parts, axis=1), num_samples, axis=0)
        image_uncond = self._uncond(image_uncond, "zeros")
        uncond_image = (
            jnp.zeros_like(image)
            if image_uncond == "zeros"
            else jnp.tile(self.unconditional_image_context(len(image), image_uncond), (1, n, 1))
        )
        if prompt and text_strength > 0:
            text = jnp.repeat(self.encode_prompts([prompt]), len(image), axis=0)
            uncond_text = self.encode_prompts([""] * len(text))
            return self.generate(
                [text, image],
                [uncond_text, uncond_image],
                ("text", "image"),
                (text_strength, 1.0 - text_strength),
                **kw,
            )
        return self.generate([image], [uncond_image], ("image",), **kw)

    # ------------------------------------------------------------------ text flows

    def image_to_text(
        self,
        images: Any,
        *,
        num_samples: int = 1,
        image_uncond: str | None = None,
        decode: dict | None = None,
        **kw,
    ) -> SampleResult:
        """Captions from images: text data layers + image-context layers, then Optimus."""
        cond = jnp.repeat(self.encode_images(_as_list(images)), num_samples, axis=0)
        uncond = self.unconditional_image_context(len(cond), self._uncond(image_uncond, "black"))
        result = self.generate([cond], [uncond], ("image",), xtype="text", **kw)
        result.texts = self.decode_text_latents(
            result.latents, seed=kw.get("seed", 0), **(decode or {})
        )
        return result

    def text_variation(
        self,
        prompts: str | Sequence[str],
        *,
        num_samples: int = 1,
        decode: dict | None = None,
        **kw,
    ) -> SampleResult:
        """Sentences like the prompt: text data layers + text-context layers, then Optimus."""
        cond = jnp.repeat(self.encode_prompts(_as_list(prompts)), num_samples, axis=0)
        uncond = self.encode_prompts([""] * len(cond))
        result = self.generate([cond], [uncond], ("text",), xtype="text", **kw)
        result.texts = self.decode_text_latents(
            result.latents, seed=kw.get("seed", 0), **(decode or {})
        )
        return result

    def i2t2i(
        self,
        image: Any,
        *,
        negative: str,
        positive: str,
        num_samples: int = 1,
        image_ratio: float = 0.33,
        decode: dict | None = None,
        **kw,
    ) -> SampleResult:
        """VD's I2T2I editing (old inference.py): caption latent of the image, minus its
        projection on the negative prompt's Optimus latent, plus the positive one,
        decoded to new sentences, which guide a dual-context regeneration with the
        image's low-rank local tokens."""
        steps = {k: v for k, v in kw.items() if k != "init_noise"}
        z = self.image_to_text(
            image, num_samples=num_samples, image_uncond="gray", decode=decode, **steps
        ).latents
        zn, zp = self.encode_text_latents([negative, positive])
        unit = zn / jnp.linalg.norm(zn)
        z_edit = z - (z @ unit)[:, None] * unit[None] + zp[None]
        sentences = self.decode_text_latents(z_edit, seed=kw.get("seed", 0), **(decode or {}))
        text = jnp.concatenate(
            [
                self.encode_prompts(sentences),
                jnp.repeat(self.encode_prompts([positive]), len(sentences), 0),
            ],
            1,
        )
        uncond_text = jnp.tile(self.encode_prompts([""] * len(sentences)), (1, 2, 1))
        # Image context: local tokens only, reduced to rank 10 (the old "style" focus).
        local = apps.adjust_rank(
            self.encode_images([image])[:, 1:], 1.0, q=10, max_drop_rank=(1, 10)
        )
        image_ctx = jnp.repeat(local, len(sentences), axis=0)
        uncond_image = jnp.repeat(
            self.unconditional_image_context(1, "gray")[:, 1:], len(sentences), 0
        )
        result = self.generate(
            [text, image_ctx],
            [uncond_text, uncond_image],
            ("text", "image"),
            (1.0 - image_ratio, image_ratio),
            **kw,
        )
        result.texts = sentences
        return result


def load_image(path: str) -> Image.Image:
    """An RGB PIL image from a path, with an error that names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path!r} does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None
