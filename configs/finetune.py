r"""Fine-tunes a VD model on your captioned images; sizes, encoders and schedule come from it.

  python -m vd_jax.datasets folder my_pngs --data_dir=data --name=mine
  python train.py --config=configs/finetune.py --workdir=runs/ft \
      --config.init_from=/path/to/versatile-diffusion \
      --config.data.name=captioned_images/mine --config.data.data_dir=data

`init_from` is any weights `sample.py` reads: a diffusers VD folder, SHI-Labs' released files
or a vd_jax run's workdir. From it the run takes the diffuser's sizes and weights, the noise
schedule, the image size and the frozen VAE / CLIP / Optimus (vd_jax/train/finetune.py); the
images and captions are encoded in the step. Sample the result with
`sample.py --config.weights=runs/ft`, export it with `python -m vd_jax.export`.

Set `--config.image_size` to train at another resolution than the source's, and
`--config.encoders.folder` to take the frozen encoders from elsewhere.

`arg` keys: flows ('source': every flow the source supports — the image flows for a diffusers
folder, all four plus dual-guided with Optimus — or names joined by '+', e.g.
flows=text_to_image+image_variation).
"""

from __future__ import annotations

import ml_collections

from configs.vd_four_flow import base_config, flows_config, parse_arg
from vd_jax.flows import TRAINABLE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, flows="source")
    c = base_config()
    c.model_from_init = True  # model, schedule, sizes and encoders from `init_from`
    c.flows_from_init = a.flows == "source"
    c.flows = flows_config(TRAINABLE if a.flows == "source" else tuple(a.flows.split("+")))
    # 0: the source's size; e.g. 256 fine-tunes the 512^2 model at 256^2.
    c.image_size = c.latent_size = 0
    c.init_from_ema = True
    c.num_steps = 2000
    c.batch_size = 16
    c.optim.update(lr=1e-5, warmup_steps=100, schedule="constant", weight_decay=0.0)
    c.ema_decay = 0.999
    c.encoders.on_the_fly = True
    c.data.update(source="tfds", kind="raw", name="", data_dir="")
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.log_every = 10
    c.sample_every = 500
    return c
