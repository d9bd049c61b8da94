"""Loading diffusers folders: every kind of damage is one clear CheckpointError."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vd_jax.convert import core
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.diffusers_folder import component_state_dict, load_diffusers_folder

UNET = "image_unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tiny_vd, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_vd["folder"], dst)
    return dst


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_weights_file(folder):
    os.remove(folder / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"vae: no weights file"):
        load_diffusers_folder(folder)


def test_missing_model_index(folder):
    os.remove(folder / "model_index.json")
    with pytest.raises(CheckpointError, match="model_index.json: file is missing"):
        load_diffusers_folder(folder)


def test_renamed_key(folder):
    key = "down_blocks.0.resnets.0.conv1.weight"
    _rewrite(folder / UNET, lambda t: t.__setitem__(key + "_renamed", t.pop(key)))
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(folder)
    msg = str(e.value)
    assert "missing keys (1)" in msg and f"image_unet.{key}" in msg
    assert "unexpected keys (1)" in msg and f"image_unet.{key}_renamed" in msg
    assert UNET.split("/")[0] in msg  # names the file


def test_wrong_shape(folder):
    key = "conv_in.weight"
    _rewrite(folder / UNET, lambda t: t.__setitem__(key, np.zeros((5, 4, 3, 3), np.float32)))
    with pytest.raises(
        CheckpointError, match=r"wrong shapes \(1\):\n    image_unet.conv_in.weight \[5, 4, 3, 3\]"
    ):
        load_diffusers_folder(folder)


def test_corrupt_safetensors(folder):
    path = folder / "text_encoder" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_diffusers_folder(folder)


def test_broken_config_json(folder):
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"vae/config.json: not valid JSON"):
        load_diffusers_folder(folder)


def test_unknown_flow(folder):
    with pytest.raises(ValueError, match="unknown flow"):
        load_diffusers_folder(folder, flows=("image_to_video",))


def test_bin_weights_load_like_safetensors(folder):
    torch = pytest.importorskip("torch")
    sub = folder / "vae"
    tensors = load_file(str(sub / "diffusion_pytorch_model.safetensors"))
    torch.save(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, sub / "diffusion_pytorch_model.bin"
    )
    os.remove(sub / "diffusion_pytorch_model.safetensors")
    state = component_state_dict(str(folder), "vae")
    assert state.source.endswith(".bin") and set(state) == set(tensors)
    k = next(iter(tensors))
    np.testing.assert_array_equal(state[k], tensors[k])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vd_jax_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": _Exploit()}, f)
    if os.path.exists("/tmp/vd_jax_pwned"):
        os.remove("/tmp/vd_jax_pwned")
    with pytest.raises(CheckpointError, match="refused or unreadable PyTorch file"):
        core.read_state_dict(path)
    assert not os.path.exists("/tmp/vd_jax_pwned")


def test_sharded_safetensors_index(folder):
    sub = folder / "image_unet"
    tensors = load_file(str(sub / "diffusion_pytorch_model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(sub / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    os.remove(sub / "diffusion_pytorch_model.safetensors")
    state = component_state_dict(str(folder), "image_unet")
    assert set(state) == set(tensors)
    models = load_diffusers_folder(folder, flows=("image_variation",))
    assert "image" in models.diffuser_params["data"]


def test_wrong_dtype(folder):
    key = "conv_in.bias"
    _rewrite(folder / UNET, lambda t: t.__setitem__(key, t[key].astype(np.int64)))
    with pytest.raises(
        CheckpointError, match=r"wrong dtypes.*\n    image_unet.conv_in.bias: int64"
    ):
        load_diffusers_folder(folder)
