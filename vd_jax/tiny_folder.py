"""`python -m vd_jax.tiny_folder OUT_DIR [tiny|small]`: a random VD folder in diffusers format.

For trying the sampler and the trainer without the released weights; no PyTorch needed.
The Flax models get the sizes of a preset of `vd_jax.convert.tiny_folder` (the configs its
diffusers-built folders have) and random params, every one perturbed with N(0, 0.05) noise,
since zero-initialised output layers would hide routing, transpose and scaling bugs;
`export_diffusers` writes the folder, which diffusers' VD pipelines load
too. `example.png` next to it is an input picture for the image flows.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import flows as vd_flows
from vd_jax.convert import core
from vd_jax.convert.components import VDModels
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.export import export_diffusers
from vd_jax.convert.tiny_folder import SIZES, preset_configs, sample_picture
from vd_jax.convert.vae import abstract_vae_params
from vd_jax.models import unet as unet_model
from vd_jax.models.abstract import abstract_params
from vd_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder

NOISE = 0.05


def _random_params(abstract: Any, seed: int) -> dict[str, Any]:
    """float32 params of the shapes of `abstract`, by name as Flax's defaults initialise them
    (kernels LeCun-normal, norm scales one, biases zero, embeddings N(0, 0.02)), each plus
    N(0, NOISE^2) noise.

    Running the diffuser's init takes about a minute of XLA compilation on a CPU; drawing
    from its abstract param tree (`jax.eval_shape`) takes a second.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in core.flatten(abstract).items():
        shape, name = tuple(leaf.shape), path.rsplit("/", 1)[-1]
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape) * 0.02
        flat[path] = (value + rng.standard_normal(shape) * NOISE).astype(np.float32)
    return core.unflatten(flat)


def random_models(size: str = "tiny", seed: int = 0) -> VDModels:
    """Random VD models with the preset `size`'s configs: every diffuser part, both CLIP
    towers, the VAE; no tokenizer (the folder gets CLIP's standard one) and no Optimus."""
    c = preset_configs(size)
    vae, text, vision = c["vae"], c["text"], c["vision"]
    key = jax.random.key(0)
    image = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
    return VDModels(
        flows=vd_flows.IMAGE_FLOWS,
        schedule=c["schedule"],
        diffuser_config=c["diffuser"],
        diffuser_params=_random_params(unet_model.abstract_params(c["diffuser"]), seed),
        vae_config=vae,
        vae_params=_random_params(abstract_vae_params(vae), seed + 1),
        text_config=text,
        text_params=_random_params(
            abstract_params(CLIPTextEncoder(text).init, key, tokens), seed + 2
        ),
        vision_config=vision,
        vision_params=_random_params(
            abstract_params(CLIPVisionEncoder(vision).init, key, image), seed + 3
        ),
        image_processor=c["image_processor"],
        image_sample_size=c["latent"],
    )


def write_folder(out: str, size: str = "tiny", seed: int = 0) -> str:
    """Writes a random `size` folder (and example.png) to `out`; replaces an earlier one."""
    replace = os.path.isfile(os.path.join(out, "model_index.json"))
    export_diffusers(random_models(size, seed), out, overwrite=replace)
    sample_picture().save(os.path.join(out, "example.png"))
    return out


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] not in SIZES):
        raise SystemExit(f"usage: python -m vd_jax.tiny_folder OUT_DIR [{'|'.join(SIZES)}]")
    size = argv[2] if len(argv) == 3 else "tiny"
    try:
        write_folder(argv[1], size)
    except CheckpointError as e:  # a folder of something else: refuse, do not replace it
        raise SystemExit(f"{e}\nchoose a new or empty folder, or an earlier tiny folder") from None
    print(f"wrote a random {size} VD pipeline to {argv[1]}")


if __name__ == "__main__":
    main(sys.argv)
