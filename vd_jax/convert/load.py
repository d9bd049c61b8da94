"""`load_models`: VD weights from any folder a user points at, whatever its format."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from vd_jax.convert.components import VDModels
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.diffusers_folder import load_diffusers_folder
from vd_jax.convert.original_files import is_original_folder, load_original_folder


def load_models(
    folder: str | os.PathLike, flows: Sequence[str], *, param_dtype: Any = jnp.float32
) -> VDModels:
    """Loads what `flows` need from a diffusers-format folder or a folder of SHI-Labs'
    released files (`vd-four-flow-v1-0-fp16.pth`, `kl-f8.pth`, `optimus-vae.pth`, ...)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return load_diffusers_folder(folder, flows, param_dtype=param_dtype)
    if is_original_folder(folder):
        return load_original_folder(folder, flows, param_dtype=param_dtype)
    raise CheckpointError(
        f"{folder}: neither a diffusers folder (model_index.json) nor a folder of the released "
        "original files (vd-four-flow-v1-0-fp16.pth / vd-four-flow-v1-0.pth, kl-f8.pth, "
        "optimus-vae.pth)"
    )
