r"""Tiny VD trainer for CPU: all five flows on fake data, a step in well under a second.

  python train.py --config=configs/tiny.py --workdir=/tmp/tw --config.num_steps=20
  python train.py --config=configs/tiny.py --workdir=/tmp/tw --config.mesh_shape=4,2

`arg` keys: kind (latents | raw: encode fake images and captions on the fly with tiny random
VAE / CLIP towers and the fake text VAE), mode (all | sample), flows ('all' or names joined
by '+', e.g. flows=text_to_image+image_to_text), levels (2 | 1: U-Net resolution levels; one
level compiles in about half the time, for runs that test the trainer rather than the model).
"""

from __future__ import annotations

import ml_collections

from configs.vd_four_flow import base_config, flows_config, parse_arg
from vd_jax.flows import TRAINABLE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, kind="latents", mode="all", flows="all", levels=2)
    if a.levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {a.levels}")
    c = base_config()
    c.num_steps = 20
    c.batch_size = 8
    c.image_size, c.latent_size = 16, 8
    c.model.update(
        model_channels=32,
        channel_mult=(1, 2)[: a.levels],
        num_res_blocks=1,
        attention_levels=(True,) * a.levels,
        num_heads=4,
        context_dim=32,
        text_dim=24,
        norm_groups=8,
    )
    c.dtype = "float32"  # bf16 matmuls are slow on CPU
    # XLA's CPU backend spends most of a tiny step's compile in LLVM optimisation; level 0
    # halves the compile for ~20% slower steps, the right trade for second-long runs.
    c.xla_opt_level = 0
    c.flows = flows_config(TRAINABLE if a.flows == "all" else tuple(a.flows.split("+")))
    c.flow_mode = a.mode
    c.optim.update(lr=3e-3, warmup_steps=2, schedule="constant")
    c.ema_decay = 0.99
    c.remat.transformer = ""
    c.fsdp_min_size = 256
    c.encoders.update(
        source="random",
        on_the_fly=a.kind == "raw",
        text_vae="fake",
        text_context_len=8,
        image_context_len=5,
        vae=dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1),
        clip_text=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            projection_dim=32,
        ),
        clip_vision=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
    )
    # Fake data by default; `--config.data.source=tfds --config.data.name=...
    # --config.data.data_dir=...` reads a dataset built by `python -m vd_jax.datasets`.
    c.data.update(source="fake", kind=a.kind, num_examples=32)
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    c.log_every = 1
    c.sample_every = 0
    c.num_samples = 4
    c.sample_steps = 4
    c.guidance_scale = 2.0
    return c
