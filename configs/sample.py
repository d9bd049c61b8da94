r"""Sampling Versatile Diffusion in JAX: every flow and VD's editing applications.

  python sample.py --config=configs/sample.py:text_to_image \
    --config.weights=/path/to/versatile-diffusion --config.prompt="a red bicycle" \
    --config.output_dir=out/t2i

The optional argument picks the flow. `weights` is a diffusers-format folder
(model_index.json; image flows only), a folder of the released original files
(vd-four-flow-v1-0-fp16.pth or vd-four-flow-v1-0.pth, kl-f8.pth, optimus-vae.pth;
all flows) or a vd_jax training run's workdir (the flows it trained; its newest
checkpoint unless `checkpoint_step` is set, its EMA params unless `use_ema=False`):

  python sample.py --config=configs/sample.py:image_to_text --config.weights=runs/demo \
    --config.image=cat.png
"""

import ml_collections

from vd_jax.flows import FLOWS  # noqa: F401  (the one flow table: `flow` is one of them)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.weights = ""  # diffusers-format VD folder, the released original files, or a run's workdir
    c.checkpoint_step = -1  # a run's checkpoint to sample; -1 = its newest complete one
    c.use_ema = True  # a run's EMA params (its raw params when it kept no EMA, or when False)
    c.flow = arg or "text_to_image"  # one of FLOWS
    c.prompt = ""  # text prompt; several prompts separated by "|"
    c.image = ""  # conditioning image path; several separated by ","
    c.text_strength = 0.5  # dual_guided / multi_context: weight of the text context
    c.num_steps = 50  # DDIM steps
    c.guidance_scale = 7.5  # classifier-free guidance; <= 1 disables it
    c.eta = 0.0  # DDIM eta (0 = deterministic)
    c.seed = 0
    c.num_samples = 1  # samples per prompt / image
    c.height = 0  # 0 = the model's default (image_unet sample_size x VAE factor)
    c.width = 0
    c.init_noise = ""  # optional .npy of initial noise, PyTorch layout [N, C, H/f, W/f] or [N, D]
    # Unconditional image context: gray (diffusers) | zeros (original app) | black (app's i2t).
    # "" = the flow's default (gray for diffusers folders' image flows, black for image_to_text).
    c.image_uncond = ""
    c.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.output_dir = "samples"
    c.progress = True  # tqdm bar over the denoising steps

    # VD's applications.
    c.focus = 0.5  # image_variation / dual_guided: 0 semantic .. 0.5 neutral .. 1 style
    c.fidelity = 0.0  # image_variation: 0 free .. <1 close to the input (SDEdit start)
    c.color_adjust = False  # image_variation: match the input's per-channel mean/std
    c.image_weights = ""  # multi_context: one weight per image, "," separated (default 1)
    c.image_focus = ""  # multi_context: one focus level per image, "," separated (default 0.5)
    c.image_masks = ""  # multi_context: mask image per image ("" to skip one), "," separated
    c.negative_prompt = ""  # i2t2i: what to remove from the image's caption
    c.positive_prompt = ""  # i2t2i: what to add

    # Text decoding (image_to_text, text_variation, i2t2i); the original samples with T=1.
    c.text_decoding = "sample"  # sample | greedy | beam
    c.temperature = 1.0
    c.top_k = 0
    c.top_p = 1.0
    c.max_text_tokens = 30
    c.num_beams = 4
    c.remove_duplicate_words = True  # the app's post-processing of repeated words
    return c
