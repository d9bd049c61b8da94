"""`load_models`: VD weights from any folder a user points at, whatever its format or place.

A folder given as a URL (``gs://bucket/vd``, any `etils.epath` scheme) is first copied to a local
cache (``$VD_JAX_CACHE``, default ``~/.cache/vd_jax/folders``; PyTorch readers and safetensors
need local files), once per URL and whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from etils import epath

from vd_jax.convert.components import VDModels
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.diffusers_folder import load_diffusers_folder
from vd_jax.convert.original_files import is_original_folder, load_original_folder


def load_models(
    folder: str | os.PathLike,
    flows: Sequence[str],
    *,
    param_dtype: Any = jnp.float32,
    optimus_halves: Sequence[str] = (),
) -> VDModels:
    """Loads what `flows` need from a diffusers-format folder or a folder of SHI-Labs'
    released files (`vd-four-flow-v1-0-fp16.pth`, `kl-f8.pth`, `optimus-vae.pth`, ...).

    `optimus_halves` ('encoder' / 'decoder') are loaded besides those the flows sample with
    (the trainer encodes captions with the encoder, which text flows never sample with)."""
    folder = local_folder(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        if optimus_halves:
            raise CheckpointError(f"{folder}: a diffusers folder has no Optimus text VAE")
        return load_diffusers_folder(folder, flows, param_dtype=param_dtype)
    if is_original_folder(folder):
        return load_original_folder(
            folder, flows, param_dtype=param_dtype, optimus_halves=optimus_halves
        )
    raise CheckpointError(
        f"{folder}: neither a diffusers folder (model_index.json) nor a folder of the released "
        "original files (vd-four-flow-v1-0-fp16.pth / vd-four-flow-v1-0.pth, kl-f8.pth, "
        "optimus-vae.pth)"
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
