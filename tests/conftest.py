"""Shared test setup: strict JAX numerics and the relative-error assertion used by parity tests."""

import os

# 8 fake CPU devices for the sharding tests; must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _torch_deterministic():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_vd(tmp_path_factory):
    """A tiny random VD pipeline saved in diffusers format, with diffusers' reference pipelines."""
    pytest.importorskip("torch")
    from vd_jax.convert.tiny_folder import build_components, reference_pipelines, save_folder

    d = tmp_path_factory.mktemp("tiny_vd")
    comps = build_components(str(d))
    folder = save_folder(comps, str(d / "folder"))
    return dict(components=comps, folder=folder, refs=reference_pipelines(comps))
