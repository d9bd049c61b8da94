r"""Single-flow recipe ("VD-basic", docs/original.md §7): image variation from SD v1.4's U-Net.

Batch 2048, lr 1e-4; only the flow's parts (global, data/image, context/image) exist.

  python train.py --config=configs/single_flow.py --workdir=/ckpt/vd1 \
      --config.init_from=/models/vd-diffusers --config.encoders.folder=/models/vd-diffusers

`arg` keys: flow (any trainer flow name, default image_variation), res (256 | 512),
context_only (1: freeze global and data layers, train the context layers alone).
"""

from __future__ import annotations

import ml_collections

from configs.vd_four_flow import base_config, flows_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, flow="image_variation", res=256, context_only=0)
    c = base_config()
    c.flows = flows_config((a.flow,))
    c.batch_size = 2048
    c.optim.lr = 1e-4
    c.image_size, c.latent_size = a.res, a.res // 8
    c.num_steps = 30_000_000 // c.batch_size
    if a.context_only:
        c.freeze = "global,data"
    return c
