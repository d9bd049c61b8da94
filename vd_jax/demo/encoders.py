"""The demo's frozen encoders on disk, and as the trainer's `FrozenEncoders`.

After pre-training (`vd_jax.demo.pretrain`) the image VAE, the Optimus text VAE and the CLIP
towers are saved in one folder in `vd_jax.convert.encoders_folder`'s format (`encoders.json`
and one msgpack file of params per model), which sampling and export also read.
`frozen_encoders(folder, ...)` turns the folder back into the `FrozenEncoders` the VD trainer
keeps out of its optimizer (`encoders.source = "demo"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import xla_options
from vd_jax.convert.encoders_folder import (
    IMAGE_CONTEXTS,
    INFO_FILE,
    EncodersFolder,
    is_encoders_folder,
    read_encoders_folder,
    write_encoders_folder,
)
from vd_jax.models.bert import BertConfig
from vd_jax.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from vd_jax.models.gpt2 import GPT2Config
from vd_jax.models.vae import AutoencoderKL, VAEConfig


def check_image_context(value: str) -> None:
    """Raises on an `image_context` other than "all" (VD's: CLS + every patch) or "cls"."""
    if value not in IMAGE_CONTEXTS:
        raise ValueError(f"image_context must be one of {IMAGE_CONTEXTS}, got {value!r}")


@dataclasses.dataclass
class DemoEncoders:
    """Configs and params of the demo's three pre-trained (or random, for CLIP) encoders.

    `text_scale` multiplies Optimus posterior means into the diffuser's text latents (1 / their
    std on the training captions, as the VAE's `scaling_factor` does for images).
    """

    vae_config: VAEConfig
    vae: Any
    bert: BertConfig
    gpt2: GPT2Config
    optimus: Any  # {"encoder": ..., "decoder": ...}
    clip_text_config: CLIPTextConfig
    clip_vision_config: CLIPVisionConfig
    clip: Any  # {"text": ..., "vision": ...}
    text_scale: float
    text_length: int
    # Image-context tokens the diffuser reads: "all" (VD's: CLS + every patch) or "cls".
    image_context: str = "all"
    metrics: dict = dataclasses.field(default_factory=dict)
    _jitted: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        check_image_context(self.image_context)

    def _jit(self, name: str, fn):
        """One compiled function per encoder, reused across batches."""
        if name not in self._jitted:
            self._jitted[name] = xla_options.jit(fn)
        return self._jitted[name]

    # ------------------------------------------------------------------ encoding, decoding

    def image_latents(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> scaled VAE posterior means (the diffuser's image latents)."""
        from vd_jax.demo.pretrain import batched
        from vd_jax.models.vae import encode_images

        model = AutoencoderKL(self.vae_config)
        fn = self._jit("vae_enc", lambda p, x: encode_images(model, p, x.astype(jnp.float32) / 255))
        return np.concatenate(batched(lambda x: np.asarray(fn(self.vae, x)), images))

    def decode_images(self, latents: np.ndarray) -> np.ndarray:
        """Scaled image latents -> float images in [0, 1]."""
        from vd_jax.demo.pretrain import batched
        from vd_jax.models.vae import decode_latents

        model = AutoencoderKL(self.vae_config)
        fn = self._jit("vae_dec", lambda p, z: decode_latents(model, p, z))
        return np.concatenate(batched(lambda z: np.asarray(fn(self.vae, z)), latents))

    def text_latents(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> scaled Optimus posterior means (the diffuser's text latents)."""
        from vd_jax.demo.pretrain import optimus_encode

        z = optimus_encode(self.bert, self.optimus["encoder"], [str(c) for c in captions])
        return (z * self.text_scale).astype(np.float32)

    def decode_texts(self, latents: np.ndarray) -> list[str]:
        """Scaled text latents -> greedy Optimus captions."""
        from vd_jax.demo.pretrain import optimus_decode

        z = np.asarray(latents, np.float32) / self.text_scale
        return optimus_decode(self.gpt2, self.optimus["decoder"], z, self.text_length)

    def text_contexts(self, captions: Sequence[str]) -> np.ndarray:
        """CLIP text contexts (VD's: all tokens / |projected EOS|) of captions."""
        from vd_jax.demo.pretrain import batched
        from vd_jax.demo.pretrain_clip import clip_token_ids

        ids = clip_token_ids(captions, self.text_length)
        model = CLIPTextEncoder(self.clip_text_config)
        fn = self._jit("clip_text", lambda p, i: model.apply({"params": p}, i, method="context"))
        return np.concatenate(batched(lambda i: np.asarray(fn(self.clip["text"], i)), ids))

    @property
    def image_context_tokens(self) -> int:
        """How many tokens an image context holds (`image_context`: all, or the CLS alone)."""
        return 1 if self.image_context == "cls" else self.clip_vision_config.num_patches + 1

    def image_contexts(self, images: np.ndarray) -> np.ndarray:
        """CLIP image contexts (post-LN + projection of the tokens / |projected CLS|).

        With `image_context="cls"` only the CLS token: the contrastive loss trains that one
        to carry the whole image, while a 2-layer tower's patch tokens stay local (see
        configs/demo.py).
        """
        from vd_jax.demo.pretrain import batched
        from vd_jax.demo.pretrain_clip import clip_pixels

        model = CLIPVisionEncoder(self.clip_vision_config)
        fn = self._jit(
            "clip_vision", lambda p, x: model.apply({"params": p}, clip_pixels(x), method="context")
        )
        n = self.image_context_tokens
        return np.concatenate(
            batched(lambda x: np.asarray(fn(self.clip["vision"], x)[:, :n]), images)
        )

    def encode_batch(self, batch: dict) -> dict[str, np.ndarray]:
        """A data batch (`image`, `caption`) -> every cached diffuser input of the four flows."""
        captions = [str(c) for c in batch["caption"]]
        images = np.asarray(batch["image"])
        return {
            "image_latent": self.image_latents(images),
            "text_latent": self.text_latents(captions),
            "text_context": self.text_contexts(captions).astype(np.float32),
            "image_context": self.image_contexts(images).astype(np.float32),
        }

    # ------------------------------------------------------------------ files

    def save(self, folder: str) -> None:
        """Writes the folder whole (vd_jax.convert.encoders_folder, which sampling reads)."""
        write_encoders_folder(
            folder,
            EncodersFolder(
                configs={
                    "vae": self.vae_config,
                    "bert": self.bert,
                    "gpt2": self.gpt2,
                    "clip_text": self.clip_text_config,
                    "clip_vision": self.clip_vision_config,
                },
                params={"vae": self.vae, "optimus": self.optimus, "clip": self.clip},
                text_scale=self.text_scale,
                text_length=self.text_length,
                image_context=self.image_context,
                metrics=self.metrics,
            ),
        )

    @classmethod
    def load(cls, folder: str) -> DemoEncoders:
        if not is_encoders_folder(folder):
            raise FileNotFoundError(f"{folder} holds no demo encoders ({INFO_FILE} is missing)")
        enc = read_encoders_folder(folder)
        cfg = enc.configs
        return cls(
            vae_config=cfg["vae"],
            vae=enc.params["vae"],
            bert=cfg["bert"],
            gpt2=cfg["gpt2"],
            optimus=enc.params["optimus"],
            clip_text_config=cfg["clip_text"],
            clip_vision_config=cfg["clip_vision"],
            clip=enc.params["clip"],
            text_scale=enc.text_scale,
            text_length=enc.text_length,
            image_context=enc.image_context,
            metrics=enc.metrics,
        )


class DemoTextVAE:
    """The trainer's pluggable `text_vae` (encode captions, decode latents) over Optimus."""

    def __init__(self, enc: DemoEncoders):
        self.enc = enc

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.enc.text_latents(texts)

    def decode(self, latents: np.ndarray) -> list[str]:
        return self.enc.decode_texts(latents)


def frozen_encoders(folder: str, context_dim: int):
    """The trainer's `FrozenEncoders` of a saved demo folder (uncond contexts included)."""
    from vd_jax.data.encoders import FrozenEncoders
    from vd_jax.demo.pretrain_clip import clip_tokenizer

    enc = DemoEncoders.load(folder)
    if enc.clip_text_config.projection_dim != context_dim:
        raise ValueError(
            f"the demo CLIP projects to {enc.clip_text_config.projection_dim}, "
            f"the diffuser's context_dim is {context_dim}"
        )
    tok = clip_tokenizer()
    out = FrozenEncoders(
        params={"vae": enc.vae, "clip_text": enc.clip["text"], "clip_vision": enc.clip["vision"]},
        vae=AutoencoderKL(enc.vae_config),
        clip_text=CLIPTextEncoder(enc.clip_text_config),
        clip_vision=CLIPVisionEncoder(enc.clip_vision_config),
        tokenizer=_FixedLength(tok, enc.text_length),
        text_vae=DemoTextVAE(enc),
        image_context_tokens=enc.image_context_tokens,
    )
    # VD's unconditional contexts: CLIP("") for text, zeros for images.
    out.params["uncond_text"] = jnp.asarray(enc.text_contexts([""]), jnp.float32)
    out.params["uncond_image"] = jnp.zeros((1, enc.image_context_tokens, context_dim), jnp.float32)
    out.params = jax.tree_util.tree_map(jnp.asarray, out.params)
    return out, enc


class _FixedLength:
    """A CLIP tokenizer that pads and truncates to the demo's caption length."""

    def __init__(self, tokenizer, length: int):
        self._tok, self.model_max_length = tokenizer, length

    def __call__(self, texts, **kwargs):
        kwargs["max_length"] = self.model_max_length
        return self._tok(texts, **kwargs)
