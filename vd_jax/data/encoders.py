"""The frozen encoders: VAE, CLIP towers and text VAE that turn raw examples into diffuser inputs.

The trainer runs them inside its jitted step on batches that lack precomputed entries
(`FrozenEncoders.encode`), and the latent cache (`vd_jax.data.caching`) runs the same ones
once over a dataset. `build_encoders` makes them from a training config: pretrained (a
diffusers folder or the released original files), random (tests), or the demo's (which the
demo builds itself and passes in).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import flows as vd_flows
from vd_jax.data.fake_data import FakeTextVAE
from vd_jax.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from vd_jax.models.optimus import OptimusVAE
from vd_jax.models.vae import AutoencoderKL, VAEConfig, encode_images
from vd_jax.processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vd_jax.processing.optimus_tokenizers import ENCODER_LENGTH

# Compile options of programs that run once (inits): XLA's backend optimisation only costs.
RUN_ONCE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=2)
def pretrained_models(folder: str, flows: tuple[str, ...]):
    """`vd_jax.convert.load.load_models` for the trainer's flows, cached: a fine-tune usually
    takes its frozen encoders and its starting diffuser from the same folder, read once.

    Text flows also get Optimus' encoder half: sampling them needs only the decoder, but
    training makes their text latents from captions with the encoder."""
    from vd_jax.convert.load import load_models

    text_data = any(vd_flows.get(f).data == "text" for f in flows)
    return load_models(folder, flows, optimus_halves=("encoder",) if text_data else ())


# The batch entries the step takes; anything else (captions, keys) stays on the host.
STEP_INPUTS = (
    "image_latent",
    "text_latent",
    "text_context",
    "image_context",
    "image",
    "text_ids",
    "optimus_ids",
    "optimus_mask",
)


@dataclasses.dataclass
class FrozenEncoders:
    """VAE, CLIP towers and text VAE, kept out of the optimizer.

    `params` (arrays only) is the step's separately sharded `frozen` argument; the modules
    are static. Image encodes (VAE latents, CLIP image contexts), CLIP text contexts and
    Optimus text latents run inside the jitted step on batches that lack the precomputed
    entries; the host only tokenizes captions (`host_prepare`). A text VAE without params
    here (`FakeTextVAE`, the demo's) makes text latents on the host instead.
    """

    # 'vae', 'clip_text', 'clip_vision', 'optimus' (Optimus' encoder half), 'uncond_text',
    # 'uncond_image'
    params: dict[str, Any]
    vae: AutoencoderKL | None = None
    clip_text: CLIPTextEncoder | None = None
    clip_vision: CLIPVisionEncoder | None = None
    tokenizer: Any = None
    # .encode(list[str]) -> [B, D]; .decode(latents) -> list[str]. With params['optimus'] it
    # is an `OptimusVAE` whose `tokenize` / `latents` the step uses instead of `encode`.
    text_vae: Any = None
    # Keep only the first N image-context tokens when encoding in the step (None: all; 1: the
    # CLS token alone, the demo's setting, see vd_jax/demo/encoders.py).
    image_context_tokens: int | None = None
    # Text latents = Optimus means x this (a source that trained its own Optimus, the demo's).
    text_latent_scale: float = 1.0

    @property
    def text_latents_in_step(self) -> bool:
        """Whether text latents are made in the step (Optimus) rather than on the host."""
        return "optimus" in self.params

    def host_prepare(self, batch: dict[str, np.ndarray], needed: set[str]) -> dict:
        """Tokenizes captions where needed; keeps only the step's inputs.

        Adds `text_ids` (CLIP) for a missing `text_context`, and for a missing `text_latent`
        `optimus_ids` / `optimus_mask` (int32 [B, ENCODER_LENGTH]) when Optimus encodes in
        the step, else `text_latent` from a host-side text VAE.
        """
        out = {k: np.asarray(v) for k, v in batch.items() if k in STEP_INPUTS}
        captions = batch.get("caption")
        if "text_context" in needed and "text_context" not in out:
            if self.tokenizer is None or captions is None:
                raise ValueError("batch has no 'text_context' and no captions + CLIP to make it")
            out["text_ids"] = self.tokenize(list(captions))
        if "text_latent" in needed and "text_latent" not in out:
            if self.text_vae is None or captions is None:
                raise ValueError("batch has no 'text_latent' and no captions + text VAE")
            out.update(self._text_vae_inputs(list(captions)))
        for k in ("image_latent", "image_context"):
            if k in needed and k not in out and "image" not in out:
                raise ValueError(f"batch has neither {k!r} nor 'image' to encode it from")
        return out

    def _text_vae_inputs(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Optimus token ids for the step to encode, or a host-side text VAE's latents."""
        if self.text_latents_in_step:
            ids, mask = self.text_vae.tokenize(captions, pad_to=ENCODER_LENGTH)
            return {"optimus_ids": ids, "optimus_mask": mask}
        if isinstance(self.text_vae, OptimusVAE):
            # Eager BERT calls would move data implicitly, which the training loop forbids.
            raise ValueError(
                "batch has no 'text_latent' and Optimus is not among the step's encoders: "
                "set encoders.on_the_fly=True to encode captions in the step"
            )
        return {"text_latent": np.asarray(self.text_vae.encode(captions), np.float32)}

    def tokenize(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True)
        return np.asarray(ids["input_ids"], np.int32)

    def clip_pixels(self, images01: jax.Array) -> jax.Array:
        """[0, 1] images -> CLIP's normalised square input (the images are square crops)."""
        s = self.clip_vision.config.image_size
        x = jax.image.resize(images01, (images01.shape[0], s, s, 3), "bicubic")
        mean, std = jnp.asarray(OPENAI_CLIP_MEAN), jnp.asarray(OPENAI_CLIP_STD)
        return (jnp.clip(x, 0.0, 1.0) - mean) / std

    def encode(self, frozen: dict, batch: dict, rng: jax.Array, needed: set[str]):
        """(inputs, uncond) for the objective; traced inside the step, no gradient."""
        inputs = {}
        for k in needed:
            if k in batch:
                inputs[k] = batch[k]
            elif k == "image_latent":
                inputs[k] = encode_images(self.vae, frozen["vae"], batch["image"], rng)
            elif k == "image_context":
                px = self.clip_pixels(batch["image"])
                ctx = self.clip_vision.apply(
                    {"params": frozen["clip_vision"]}, px, method="context"
                )
                inputs[k] = ctx[:, : self.image_context_tokens]
            elif k == "text_context":
                inputs[k] = self.clip_text.apply(
                    {"params": frozen["clip_text"]}, batch["text_ids"], method="context"
                )
            elif k == "text_latent":
                ids, mask = batch["optimus_ids"], batch["optimus_mask"]
                latents = self.text_vae.latents(frozen["optimus"], ids, mask)
                inputs[k] = latents * self.text_latent_scale
        inputs = jax.lax.stop_gradient(inputs)
        uncond = {"text": frozen["uncond_text"], "image": frozen["uncond_image"]}
        return inputs, jax.lax.stop_gradient(uncond)


def _init_once(init, *args):
    """A module's params from one jitted `init` compiled without XLA's backend optimisation:
    a program run once gains nothing from it (tiny VAE: 3.7 s to compile instead of 10.7 s)."""
    return jax.jit(init).lower(*args).compile(RUN_ONCE)(*args)


def build_encoders(config, flows: tuple[str, ...], rng: jax.Array) -> FrozenEncoders:
    """The frozen VAE / CLIP / text VAE the flows need, random (tests) or pretrained."""
    e = config.encoders
    enc = FrozenEncoders(params={})
    text_data = any(vd_flows.get(f).data == "text" for f in flows)
    if e.source == "pretrained":
        _add_pretrained(enc, config, flows, optimus=text_data and e.text_vae == "optimus")
    elif e.source == "random":
        _add_random(enc, config, flows, rng)
    elif e.source == "demo":
        raise ValueError(
            "encoders.source='demo': the demo's encoders are trained by the demo and passed to "
            "the trainer by it; run `python train.py --config=configs/demo.py --workdir=DIR`"
        )
    else:
        raise ValueError(
            f"encoders.source must be 'pretrained', 'random' or 'demo', got {e.source!r}"
        )
    if text_data and enc.text_vae is None and e.text_vae == "fake":
        enc.text_vae = FakeTextVAE(config.model.text_dim, seed=config.seed)
    _add_unconditional(enc, config)
    return enc


def _add_pretrained(enc: FrozenEncoders, config, flows: tuple[str, ...], optimus: bool) -> None:
    """The VAE, CLIP towers and Optimus of `encoders.folder` (any format `load_models` reads)."""
    e = config.encoders
    m = pretrained_models(e.folder, tuple(flows))
    enc.vae, enc.params["vae"] = AutoencoderKL(m.vae_config), m.vae_params
    # A vd_jax run's own encoders (the demo's) may read fewer image tokens, scale text latents.
    enc.image_context_tokens, enc.text_latent_scale = m.image_context_tokens, m.text_latent_scale
    if m.text_config is not None:
        enc.clip_text, enc.tokenizer = CLIPTextEncoder(m.text_config), m.tokenizer
        enc.params["clip_text"] = m.text_params
    if m.vision_config is not None and e.on_the_fly:
        enc.clip_vision = CLIPVisionEncoder(m.vision_config)
        enc.params["clip_vision"] = m.vision_params
    if optimus:
        enc.text_vae = OptimusVAE(
            m.optimus_configs,
            m.optimus_params,
            m.bert_tokenizer,
            m.gpt2_tokenizer,
            lowercase=m.optimus_lowercase,
        )
        if e.on_the_fly:  # else text latents come precomputed: no BERT on the devices
            enc.params["optimus"] = enc.text_vae.encoder_params


def _add_random(enc: FrozenEncoders, config, flows: tuple[str, ...], rng: jax.Array) -> None:
    """Random encoders of the config's `encoders.vae / clip_text / clip_vision` sizes."""
    from vd_jax.processing.clip_tokenizer import bundled_clip_tokenizer

    e = config.encoders
    k_vae, k_text, k_vis = jax.random.split(rng, 3)
    if any(vd_flows.get(f).data == "image" for f in flows):
        enc.vae = AutoencoderKL(VAEConfig(**e.vae))
        x = jnp.zeros((1, config.image_size, config.image_size, 3))
        enc.params["vae"] = _init_once(enc.vae.init, k_vae, x)["params"]
    if not e.on_the_fly:
        return
    enc.tokenizer = bundled_clip_tokenizer()
    enc.clip_text = CLIPTextEncoder(CLIPTextConfig(**e.clip_text))
    ids = jnp.zeros((1, 77), jnp.int32)
    enc.params["clip_text"] = _init_once(enc.clip_text.init, k_text, ids)["params"]
    enc.clip_vision = CLIPVisionEncoder(CLIPVisionConfig(**e.clip_vision))
    s = enc.clip_vision.config.image_size
    px = jnp.zeros((1, s, s, 3))
    enc.params["clip_vision"] = _init_once(enc.clip_vision.init, k_vis, px)["params"]


def _add_unconditional(enc: FrozenEncoders, config) -> None:
    """Unconditional contexts: CLIP("") for text (VD's), zeros for images (the new app's)."""
    e, cdim = config.encoders, config.model.context_dim
    text_len = 77 if e.on_the_fly else e.text_context_len
    image_len = e.image_context_len
    if e.on_the_fly and enc.clip_vision is not None:
        image_len = enc.image_context_tokens or enc.clip_vision.config.num_patches + 1
    if enc.clip_text is not None:
        ids = jnp.asarray(enc.tokenize([""]))
        ctx = enc.clip_text.apply({"params": enc.params["clip_text"]}, ids, method="context")
        enc.params["uncond_text"] = ctx[:, :text_len].astype(jnp.float32)
    else:
        enc.params["uncond_text"] = jnp.zeros((1, text_len, cdim), jnp.float32)
    enc.params["uncond_image"] = jnp.zeros((1, image_len, cdim), jnp.float32)
