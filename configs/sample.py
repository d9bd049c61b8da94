r"""Sampling from a diffusers-format Versatile Diffusion folder.

  python sample.py --config=configs/sample.py:text_to_image \
    --config.weights=/path/to/versatile-diffusion --config.prompt="a red bicycle" \
    --config.output_dir=out/t2i

The optional argument picks the flow (text_to_image | image_variation | dual_guided).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.weights = ""  # diffusers-format VD folder (model_index.json at its top)
    c.flow = arg or "text_to_image"  # text_to_image | image_variation | dual_guided
    c.prompt = ""  # text prompt; several prompts separated by "|"
    c.image = ""  # conditioning image path; several separated by ","
    c.text_strength = 0.5  # dual_guided: weight of the text context (image gets 1 - this)
    c.num_steps = 50  # DDIM steps
    c.guidance_scale = 7.5  # classifier-free guidance; <= 1 disables it
    c.eta = 0.0  # DDIM eta (0 = deterministic)
    c.seed = 0
    c.num_samples = 1  # samples per prompt / image
    c.height = 0  # 0 = the model's default (image_unet sample_size x VAE factor)
    c.width = 0
    c.init_noise = ""  # optional .npy of initial latents, PyTorch layout [N, C, H/f, W/f]
    c.image_uncond = "gray"  # unconditional image context: gray (diffusers) | zeros (original app)
    c.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.output_dir = "samples"
    c.progress = True  # tqdm bar over the denoising steps
    return c
