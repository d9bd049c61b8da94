"""`load_models`: VD weights from any folder a user points at, whatever its format or place:
a diffusers-format folder, SHI-Labs' released files, or a vd_jax training run's workdir.

A folder given as a URL (``gs://bucket/vd``, any `etils.epath` scheme) is first copied to a local
cache (``$VD_JAX_CACHE``, default ``~/.cache/vd_jax/folders``; PyTorch readers and safetensors
need local files), once per URL and whole or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from etils import epath

from vd_jax import flows as vd_flows
from vd_jax.convert import diffusers_folder, original_files, run_folder
from vd_jax.convert.components import VDModels
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.diffusers_folder import load_diffusers_folder
from vd_jax.convert.original_files import is_original_folder, load_original_folder
from vd_jax.convert.run_folder import load_run, run_dir
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.unet import DiffuserConfig


def load_models(
    folder: str | os.PathLike,
    flows: Sequence[str] | None,
    *,
    param_dtype: Any = jnp.float32,
    optimus_halves: Sequence[str] = (),
    checkpoint_step: int | None = None,
    use_ema: bool = True,
) -> VDModels:
    """Loads what `flows` need from a diffusers-format folder, a folder of SHI-Labs'
    released files (`vd-four-flow-v1-0-fp16.pth`, `kl-f8.pth`, `optimus-vae.pth`, ...) or a
    vd_jax run (its workdir: `vd_jax.convert.run_folder`).

    Args:
      folder: local or a URL (``gs://...``).
      flows: the flows to prepare; None loads everything the source holds (for export).
      param_dtype: storage dtype of the params.
      optimus_halves: ('encoder' / 'decoder') loaded besides those the flows sample with
        (the trainer encodes captions with the encoder, which text flows never sample with).
      checkpoint_step: a run's checkpoint to read (default: its newest complete one).
      use_ema: a run's EMA params when it kept them (else its raw params).
    """
    if run_dir(folder) is not None:
        return load_run(
            folder, flows, param_dtype=param_dtype, checkpoint_step=checkpoint_step,
            use_ema=use_ema, optimus_halves=optimus_halves,
        )  # fmt: skip
    if checkpoint_step is not None:
        raise CheckpointError(
            f"{folder}: checkpoint_step={checkpoint_step} applies to vd_jax runs, and this is "
            "not one (no vd_model.json)"
        )
    name = os.fspath(folder)
    folder = local_folder(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        if optimus_halves:
            raise CheckpointError(f"{folder}: a diffusers folder has no Optimus text VAE")
        models = load_diffusers_folder(folder, flows, param_dtype=param_dtype)
    elif is_original_folder(folder):
        models = load_original_folder(
            folder, flows, param_dtype=param_dtype, optimus_halves=optimus_halves
        )
    else:
        raise _not_a_source(folder)
    models.source = name
    return models


def _not_a_source(folder: str) -> CheckpointError:
    return CheckpointError(
        f"{folder}: neither a diffusers folder (model_index.json), a folder of the released "
        "original files (vd-four-flow-v1-0-fp16.pth / vd-four-flow-v1-0.pth, kl-f8.pth, "
        "optimus-vae.pth) nor a vd_jax run (vd_model.json)"
    )


def local_folder(folder: str | os.PathLike) -> str:
    """`folder` itself when local; else a local copy of the URL's tree (made once)."""
    folder = os.fspath(folder)
    if "://" not in folder:
        return folder
    src = epath.Path(folder)
    if not src.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    root = epath.Path(os.environ.get("VD_JAX_CACHE", "~/.cache/vd_jax")).expanduser() / "folders"
    dest = root / hashlib.sha256(folder.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        tmp = root / f"{dest.name}.partial.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        copy_tree(src, tmp)
        (tmp / ".complete").write_text(folder)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    return os.fspath(dest)


def copy_tree(src: epath.Path, dst: epath.Path) -> None:
    """Copies the folder `src` to `dst`, file by file; either may be a URL."""
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            (dst / child.name).write_bytes(child.read_bytes())


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What a fine-tune copies from its source, read from configs alone (no weights)."""

    diffuser: DiffuserConfig
    schedule: NoiseSchedule
    flows: tuple[str, ...]  # the trainable flows the source has the encoders for
    latent_size: int
    image_size: int


def describe(folder: str | os.PathLike) -> SourceInfo:
    """Sizes, schedule and flows of any source `load_models` reads, without its weights."""
    run = run_dir(folder)
    if run is not None:
        rec = run_folder.read_record(run)
        return SourceInfo(
            diffuser=run_folder.diffuser_config(rec),
            schedule=run_folder.schedule(rec),
            flows=vd_flows.check(rec["flows"], trainable=True),
            latent_size=int(rec["latent_size"]),
            image_size=int(rec["image_size"]),
        )
    folder = local_folder(folder)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        info = diffusers_folder.describe(folder)
    elif is_original_folder(folder):
        info = original_files.describe(folder)
    else:
        raise _not_a_source(folder)
    diffuser, schedule, flows, latent, factor = info
    return SourceInfo(diffuser, schedule, flows, latent, latent * factor)
