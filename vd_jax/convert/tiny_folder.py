"""Random Versatile Diffusion pipelines in diffusers format ("tiny" and "small") built with
diffusers/transformers, and diffusers' reference flow pipelines on the same weights.

For the parity tests and benchmarks, which compare vd_jax with diffusers on the same random
weights; needs the `torch` extra. Every weight is perturbed with noise after construction:
diffusers zero-inits output convs and attention projections, and zeros would hide routing,
transpose and scaling bugs. `python -m vd_jax.tiny_folder` writes the same kind of folder
without PyTorch (vd_jax/tiny_folder.py), with the configs of `preset_configs`.
"""

from __future__ import annotations

import copy
import os

import numpy as np
from PIL import Image

from vd_jax.processing.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

IMAGE_PX = 16  # "tiny" output images (VAE factor 2, latent 8x8)

# Sizes per preset. "tiny" runs a DDIM step in milliseconds; "small" has the released
# model's structure (3 levels, attention on the first two, 8 heads) at 1/5 the width.
SIZES = {
    "tiny": dict(
        ctx=32,
        clip_hidden=32,
        clip_layers=2,
        unet_channels=(32, 64),
        heads=4,
        groups=8,
        vae_channels=(16, 32),
        latent=8,
        text_dim=24,
    ),
    "small": dict(
        ctx=64,
        clip_hidden=64,
        clip_layers=4,
        unet_channels=(64, 128, 128),
        heads=8,
        groups=32,
        vae_channels=(32, 64, 64),
        latent=16,
        text_dim=96,
    ),
}


def _tower_sizes(z: dict) -> dict:
    """The sizes both CLIP towers share (transformers' field names)."""
    return dict(
        hidden_size=z["clip_hidden"],
        intermediate_size=37 + z["clip_hidden"],
        num_hidden_layers=z["clip_layers"],
        num_attention_heads=4,
        projection_dim=z["ctx"],
        hidden_act="quick_gelu",
    )


def preset_configs(size: str) -> dict:
    """vd_jax's configs of the models `build_components` builds for the preset `size`."""
    from vd_jax.diffusion.schedules import NoiseSchedule
    from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
    from vd_jax.models.unet import DiffuserConfig
    from vd_jax.models.vae import VAEConfig
    from vd_jax.processing.images import CLIPImageProcessorConfig

    z = SIZES[size]
    ch, vae_ch = z["unet_channels"], z["vae_channels"]
    tower = _tower_sizes(z)
    return dict(
        diffuser=DiffuserConfig(
            model_channels=ch[0],
            channel_mult=tuple(c // ch[0] for c in ch),
            num_res_blocks=2,
            attention_levels=(True,) * (len(ch) - 1) + (False,),
            num_heads=z["heads"],
            context_dim=z["ctx"],
            text_dim=z["text_dim"],
            norm_groups=z["groups"],
        ),
        vae=VAEConfig(
            block_out_channels=vae_ch,
            layers_per_block=1,
            norm_num_groups=min(z["groups"], 16),
            sample_size=z["latent"] * 2 ** (len(vae_ch) - 1),
        ),
        text=CLIPTextConfig(eos_token_id=49407, **tower),  # transformers' current default
        vision=CLIPVisionConfig(image_size=32, patch_size=2, **tower),
        image_processor=CLIPImageProcessorConfig(size=32, crop_size=(32, 32)),
        schedule=NoiseSchedule(),  # = _image_processor_and_scheduler's DDIMScheduler
        latent=z["latent"],
    )


def _perturb(module, seed: int, scale: float = 0.05) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _clip_towers(z: dict) -> tuple:
    """CLIP text and vision towers with projections (transformers)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tower = _tower_sizes(z)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **tower)
    ).eval()
    # 32 px / patch 2 = 256 patches + CLS = 257 tokens, as diffusers' dual pipeline assumes.
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=32, patch_size=2, **tower)
    ).eval()
    return text, vision


def _unets(z: dict) -> tuple:
    """diffusers' image U-Net and VD's flat text U-Net, VD's layer layout."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
        UNetFlatConditionModel,
    )

    unet_kw = dict(
        block_out_channels=z["unet_channels"],
        layers_per_block=2,
        cross_attention_dim=z["ctx"],
        attention_head_dim=z["heads"],
        norm_num_groups=z["groups"],
    )
    levels = len(z["unet_channels"])
    attn = [True] * (levels - 1) + [False]  # VD: attention everywhere but the deepest level
    down = lambda a, flat: ("CrossAttnDownBlock" if a else "DownBlock") + ("Flat" if flat else "2D")
    up = lambda a, flat: ("CrossAttnUpBlock" if a else "UpBlock") + ("Flat" if flat else "2D")
    image_unet = UNet2DConditionModel(
        sample_size=z["latent"],
        in_channels=4,
        out_channels=4,
        down_block_types=tuple(down(a, False) for a in attn),
        up_block_types=tuple(up(a, False) for a in reversed(attn)),
        **unet_kw,
    ).eval()
    text_unet = UNetFlatConditionModel(
        in_channels=(z["text_dim"], 1, 1),
        out_channels=(z["text_dim"], 1, 1),
        down_block_types=tuple(down(a, True) for a in attn),
        up_block_types=tuple(up(a, True) for a in reversed(attn)),
        **unet_kw,
    ).eval()
    return image_unet, text_unet


def _vae(z: dict):
    from diffusers import AutoencoderKL

    levels = len(z["vae_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=z["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=min(z["groups"], 16),
        sample_size=z["latent"] * 2 ** (levels - 1),
    ).eval()


def _image_processor_and_scheduler() -> tuple:
    """VD's CLIP preprocessing (at 32 px) and DDIM scheduler configs."""
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        resample=3,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return processor, scheduler


def build_components(tmp_dir: str, seed: int = 0, size: str = "tiny") -> dict:
    """Random diffusers/transformers VD components of the given size preset."""
    import torch

    z = SIZES[size]
    torch.manual_seed(seed)
    text_encoder, image_encoder = _clip_towers(z)
    image_unet, text_unet = _unets(z)
    vae = _vae(z)
    for i, m in enumerate((text_encoder, image_encoder, image_unet, text_unet, vae)):
        _perturb(m, seed * 10 + i)
    # diffusers' converter copies VD's one time embedding into both U-Nets.
    text_unet.time_embedding.load_state_dict(image_unet.time_embedding.state_dict())
    tok_dir = write_clip_tokenizer_files(os.path.join(tmp_dir, "_tokenizer_src"))
    processor, scheduler = _image_processor_and_scheduler()
    return dict(
        tokenizer=load_clip_tokenizer(tok_dir),
        image_feature_extractor=processor,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        image_unet=image_unet,
        text_unet=text_unet,
        vae=vae,
        scheduler=scheduler,
    )


def save_folder(components: dict, path: str) -> str:
    from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionPipeline

    VersatileDiffusionPipeline(**components).save_pretrained(path, safe_serialization=True)
    return path


def reference_pipelines(components: dict) -> dict:
    """The three diffusers flow pipelines, each on its own copy (they rewire U-Nets in place)."""
    from diffusers.pipelines.deprecated.versatile_diffusion import (
        VersatileDiffusionDualGuidedPipeline,
        VersatileDiffusionImageVariationPipeline,
        VersatileDiffusionTextToImagePipeline,
    )

    c = lambda name: copy.deepcopy(components[name])
    t2i = VersatileDiffusionTextToImagePipeline(
        tokenizer=c("tokenizer"),
        text_encoder=c("text_encoder"),
        image_unet=c("image_unet"),
        text_unet=c("text_unet"),
        vae=c("vae"),
        scheduler=c("scheduler"),
    )
    iv = VersatileDiffusionImageVariationPipeline(
        image_feature_extractor=c("image_feature_extractor"),
        image_encoder=c("image_encoder"),
        image_unet=c("image_unet"),
        vae=c("vae"),
        scheduler=c("scheduler"),
    )
    dual = VersatileDiffusionDualGuidedPipeline(
        **{k: c(k) for k in components if k != "safety_checker"}
    )
    for p in (t2i, iv, dual):
        p.set_progress_bar_config(disable=True)
    return dict(text_to_image=t2i, image_variation=iv, dual_guided=dual)


def sample_picture(seed: int = 0, size: tuple[int, int] = (40, 52)) -> Image.Image:
    """A smooth non-square RGB picture (so resize and crop matter)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 3)), np.cos(5 * yy), xx * yy], -1)
    arr = (base - base.min()) / (np.ptp(base) + 1e-9)
    return Image.fromarray((arr * 255).astype(np.uint8))
