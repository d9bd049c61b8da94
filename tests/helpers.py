"""Assertions shared by the parity tests."""

from pathlib import Path

import numpy as np


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the one error measure of every parity test."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def assert_rel_close(actual, expected, tol: float = 1e-4, what: str = ""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# Key/shape manifests of the released checkpoints (tiny and full size), kept in the repository.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original_vd"


def manifest(name: str) -> dict:
    """{key: {"shape", "dtype"}} of one released file (fixtures/original_vd/<name>)."""
    import json

    return json.loads((FIXTURES / name).read_text())["keys"]


def random_state(keys: dict, seed: int, causal_masks: bool = False) -> dict:
    """Random torch tensors with a manifest's keys, shapes and dtypes (0.05 std); GPT-2's
    lm_head tied to its token embeddings as in the released file; with `causal_masks` the
    attention-mask buffers hold the causal masks the original code builds."""
    import torch

    rng = np.random.default_rng(seed)
    out = {}
    for key, info in keys.items():
        dtype = np.dtype(info["dtype"].replace("torch.", ""))
        shape = tuple(info["shape"])
        if causal_masks and key.endswith(".attn.bias") and len(shape) == 4:
            arr = np.tril(np.ones(shape[-2:], dtype))[None, None]
        elif np.issubdtype(dtype, np.integer):
            arr = np.zeros(shape, dtype)
        else:
            arr = np.asarray(rng.standard_normal(shape) * 0.05, dtype)
        out[key] = torch.from_numpy(np.array(arr))
    for key in out:
        if key.endswith("decoder.lm_head.weight"):
            out[key] = out[key.replace("lm_head.weight", "transformer.wte.weight")]
    return out


def write_tiny_original(folder: Path, seed: int = 1) -> Path:
    """A folder of the released files at the tiny sizes (tiny_config.json): the new fp16
    diffuser, kl-f8, optimus-vae, a transformers CLIP in clip/ and vd_config.json."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "vd-four-flow-v1-0-fp16.pth": "tiny_four_flow_new_fp16.json",
        "kl-f8.pth": "tiny_kl_f8.json",
        "optimus-vae.pth": "tiny_optimus_vae.json",
    }
    for i, (name, keys) in enumerate(files.items()):
        torch.save(random_state(manifest(keys), seed + i, causal_masks=True), folder / name)
    config = json.loads((FIXTURES / "tiny_config.json").read_text())
    clip = config["ctx (CLIP)"]
    torch.manual_seed(seed)
    CLIPModel(
        CLIPConfig(
            text_config=clip["text"],
            vision_config=clip["vision"],
            projection_dim=clip["projection_dim"],
        )
    ).save_pretrained(folder / "clip")
    (folder / "vd_config.json").write_text(json.dumps(config))
    return folder
