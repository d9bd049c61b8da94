"""Fine-tuning without copying sizes: a config's model, schedule, encoders and flows taken from
the source it starts from (`configs/finetune.py`).

A config with `model_from_init` set gets, from `config.init_from` (a diffusers VD folder,
SHI-Labs' released files or a vd_jax run; `vd_jax.convert.load.describe` reads only their
configs): the diffuser's sizes, the noise schedule and its prediction type, the image size
(unless `image_size` is set: then the latents follow it), the frozen encoders (`encoders.folder`
= the source itself unless set, encoding raw images and captions in the step) and, with
`flows_from_init`, the flows the source supports.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections
from absl import logging

from vd_jax.convert.load import describe


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` itself, or for a fine-tune config a copy completed from its source."""
    if not config.get("model_from_init", False):
        return config
    if not config.init_from:
        raise ValueError(
            "this config takes its model from its source: give --config.init_from=PATH (a "
            "diffusers VD folder, the released original files or a vd_jax run's workdir)"
        )
    info = describe(config.init_from)
    out = copy.deepcopy(config)
    with out.unlocked():
        out.model.update(dataclasses.asdict(info.diffuser))
        schedule = dataclasses.asdict(info.schedule)
        out.prediction_type = schedule.pop("prediction_type")
        out.schedule = schedule
        if not config.image_size:  # 0: the source's; a set size trains at that resolution
            out.latent_size, out.image_size = info.latent_size, info.image_size
        else:
            out.latent_size = config.image_size * info.latent_size // info.image_size
        out.encoders.update(
            source="pretrained", folder=config.encoders.folder or config.init_from, on_the_fly=True
        )
        if config.get("flows_from_init", False):
            out.flows = _flows_config(info.flows, config.flows)
    logging.info(
        "fine-tune of %s: flows %s, %dx%d images, diffuser %s",
        config.init_from, list(out.flows), out.image_size, out.image_size, info.diffuser,
    )  # fmt: skip
    return out


def _flows_config(names: tuple[str, ...], template: ml_collections.ConfigDict):
    """Per-flow settings for `names`, each a copy of the template's first entry."""
    first = next(iter(template.values()))
    return ml_collections.ConfigDict({n: copy.deepcopy(first.to_dict()) for n in names})
