"""Encoders a vd_jax run made itself, on disk: the demo's pre-trained VAE, Optimus and CLIP, or
a test run's random ones.

One folder (local or any `etils.epath` URL): `encoders.json` (the config of every model present,
the text latent scale, the CLIP caption length and which image tokens the diffuser reads) and
one msgpack file of params per model (`vae.msgpack`, `optimus.msgpack` with `encoder` /
`decoder`, `clip.msgpack` with `text` / `vision`): flax serialization, plain arrays, nothing
executable. `add_to_models` puts a folder's encoders into `VDModels` for sampling and export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import flax.serialization
import jax
import numpy as np
from etils import epath

from vd_jax.convert.components import VDModels
from vd_jax.convert.core import CheckpointError
from vd_jax.models.bert import BertConfig
from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vd_jax.models.gpt2 import GPT2Config
from vd_jax.models.vae import VAEConfig
from vd_jax.processing.images import CLIPImageProcessorConfig

INFO_FILE = "encoders.json"
CONFIG_TYPES = {
    "vae": VAEConfig,
    "bert": BertConfig,
    "gpt2": GPT2Config,
    "clip_text": CLIPTextConfig,
    "clip_vision": CLIPVisionConfig,
}
PARAM_FILES = ("vae", "optimus", "clip")
IMAGE_CONTEXTS = ("all", "cls")


@dataclasses.dataclass
class EncodersFolder:
    """What the folder holds.

    Attributes:
      configs: name (a key of CONFIG_TYPES) -> config, for the models present.
      params: 'vae' -> params; 'optimus' -> {'encoder', 'decoder'}; 'clip' -> {'text', 'vision'}.
      text_scale: diffuser text latents = Optimus means x text_scale.
      text_length: CLIP caption length the text tower was trained on (its positions).
      image_context: "all" (CLS + every patch, VD's) or "cls" (the CLS token alone).
      metrics: anything worth keeping with them (the demo's pre-training scores).
    """

    configs: dict[str, Any]
    params: dict[str, Any]
    text_scale: float = 1.0
    text_length: int = 77
    image_context: str = "all"
    metrics: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.image_context not in IMAGE_CONTEXTS:
            raise ValueError(
                f"image_context must be one of {IMAGE_CONTEXTS}, got {self.image_context!r}"
            )


def is_encoders_folder(folder: str | os.PathLike) -> bool:
    return (epath.Path(folder) / INFO_FILE).exists()


def write_encoders_folder(folder: str | os.PathLike, enc: EncodersFolder) -> None:
    """Writes the folder whole: local folders are built aside and renamed into place; on an
    object store `encoders.json` goes last, so a reader never finds it without its params."""
    info = {
        "configs": {k: dataclasses.asdict(c) for k, c in enc.configs.items()},
        "text_scale": enc.text_scale,
        "text_length": enc.text_length,
        "image_context": enc.image_context,
        "metrics": enc.metrics,
    }
    blobs = {
        f"{name}.msgpack": flax.serialization.msgpack_serialize(jax.device_get(enc.params[name]))
        for name in PARAM_FILES
        if enc.params.get(name) is not None
    }
    blobs[INFO_FILE] = json.dumps(info, indent=1).encode()
    if "://" in os.fspath(folder):
        dest = epath.Path(folder)
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(blobs, key=lambda n: n == INFO_FILE):
            (dest / name).write_bytes(blobs[name])
        return
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".encoders_tmp")
    for name, data in blobs.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    if os.path.exists(folder):
        os.rename(folder, tmp + ".old")
    os.rename(tmp, folder)


def read_encoders_folder(folder: str | os.PathLike) -> EncodersFolder:
    path = epath.Path(folder)
    if not (path / INFO_FILE).exists():
        raise CheckpointError(f"{folder}: holds no vd_jax encoders ({INFO_FILE} is missing)")
    try:
        info = json.loads((path / INFO_FILE).read_text())
        configs = {
            k: _config(CONFIG_TYPES[k], d) for k, d in info["configs"].items() if k in CONFIG_TYPES
        }
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / INFO_FILE}: unreadable ({type(e).__name__}: {e})") from None
    params = {}
    for name in PARAM_FILES:
        f = path / f"{name}.msgpack"
        if f.exists():
            params[name] = flax.serialization.msgpack_restore(f.read_bytes())
    return EncodersFolder(
        configs=configs,
        params=params,
        text_scale=float(info.get("text_scale", 1.0)),
        text_length=int(info.get("text_length", 77)),
        image_context=info.get("image_context", "all"),
        metrics=info.get("metrics", {}),
    )


def _config(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def cast_params(tree: Any, dtype: Any) -> Any:
    """A tree of numpy arrays in `dtype`."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), tree)


def add_to_models(
    models: VDModels, enc: EncodersFolder, *, text: bool, vision: bool, optimus: bool, dtype
) -> None:
    """Puts the folder's VAE and the CLIP towers / Optimus asked for into `models`.

    Raises `CheckpointError` naming what the folder lacks."""
    from vd_jax.processing.clip_tokenizer import bundled_clip_tokenizer
    from vd_jax.processing.optimus_tokenizers import load_bert_tokenizer, load_gpt2_tokenizer

    needed = ["vae"] + ["clip_text"] * text + ["clip_vision"] * vision + ["bert", "gpt2"] * optimus
    absent = [k for k in needed if k not in enc.configs]
    if absent:
        raise CheckpointError(
            f"the run's encoders hold no {absent} (was it trained on precomputed inputs?)"
        )
    models.vae_config, models.vae_params = enc.configs["vae"], cast_params(enc.params["vae"], dtype)
    models.image_uncond = "zeros"  # vd_jax's trainer: zero image contexts for dropped ones
    if text:
        models.text_config = enc.configs["clip_text"]
        models.text_params = cast_params(enc.params["clip"]["text"], dtype)
        models.tokenizer = bundled_clip_tokenizer()
        models.tokenizer.model_max_length = enc.text_length
    if vision:
        cfg = enc.configs["clip_vision"]
        models.vision_config = cfg
        models.vision_params = cast_params(enc.params["clip"]["vision"], dtype)
        s = cfg.image_size
        models.image_processor = CLIPImageProcessorConfig(size=s, crop_size=(s, s))
        models.image_context_tokens = 1 if enc.image_context == "cls" else None
    if optimus:
        models.optimus_configs = (enc.configs["bert"], enc.configs["gpt2"])
        models.optimus_params = cast_params(enc.params["optimus"], dtype)
        models.bert_tokenizer = load_bert_tokenizer()
        models.gpt2_tokenizer = load_gpt2_tokenizer()
        models.text_latent_scale = enc.text_scale
