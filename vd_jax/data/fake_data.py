"""Deterministic fake training data with the input pipeline's interface, and a fake text VAE.

`FakeIterator` yields host-local numpy batches like `vd_jax.data.input_pipeline.create_iterator`:
with `kind='latents'` the precomputed entries ('image_latent' [B, h, w, 4], 'text_latent'
[B, D], 'text_context' [B, Lt, C], 'image_context' [B, Li, C]); with `kind='raw'` what a
captioned-image dataset gives ('image' float32 [B, H, W, 3] in [0, 1], 'caption'). Batch n is
drawn from a fixed pool of examples by `(seed, n)` for the *global* batch and then cut to this
host's rows, so any process count sees the same global batches. `get_state`/`set_state`
(JSON-able) resume exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

_WORDS = ("red", "blue", "green", "cat", "dog", "house", "tree", "car", "sky", "sea", "small")


def _smooth(rng: np.random.Generator, n: int, h: int, w: int, c: int, scale: int) -> np.ndarray:
    """Low-frequency noise: learnable structure rather than white noise."""
    coarse = rng.standard_normal((n, max(h // scale, 1), max(w // scale, 1), c))
    up = coarse.repeat(scale, axis=1).repeat(scale, axis=2)[:, :h, :w]
    return up.astype(np.float32)


class FakeIterator:
    """Batches of fake VD examples (see the module docstring)."""

    def __init__(
        self,
        *,
        global_batch_size: int,
        kind: str = "latents",
        num_examples: int = 64,
        latent_size: int = 8,
        image_size: int = 16,
        text_dim: int = 24,
        context_dim: int = 32,
        text_context_len: int = 8,
        image_context_len: int = 5,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if kind not in ("latents", "raw"):
            raise ValueError(f"fake data kind must be 'latents' or 'raw', got {kind!r}")
        if global_batch_size % process_count:
            raise ValueError(f"batch {global_batch_size} is not divisible by {process_count} hosts")
        self.kind, self.seed = kind, seed
        self.global_batch_size = global_batch_size
        self.per_host = global_batch_size // process_count
        self.offset = process_index * self.per_host
        self.index = 0
        rng = np.random.default_rng([seed, 12345])
        n = num_examples
        captions = [" ".join(rng.choice(_WORDS, size=3)) + f" number {i}" for i in range(n)]
        self.pool: dict[str, np.ndarray] = {"caption": np.asarray(captions, dtype=object)}
        if kind == "latents":
            self.pool["image_latent"] = _smooth(rng, n, latent_size, latent_size, 4, 2)
            self.pool["text_latent"] = rng.standard_normal((n, text_dim)).astype(np.float32)
            self.pool["text_context"] = rng.standard_normal(
                (n, text_context_len, context_dim)
            ).astype(np.float32)
            self.pool["image_context"] = rng.standard_normal(
                (n, image_context_len, context_dim)
            ).astype(np.float32)
        else:
            img = _smooth(rng, n, image_size, image_size, 3, 4)
            self.pool["image"] = (1.0 / (1.0 + np.exp(-img))).astype(np.float32)

    def __iter__(self) -> FakeIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        rows = rng.integers(0, len(self.pool["caption"]), self.global_batch_size)
        rows = rows[self.offset : self.offset + self.per_host]
        self.index += 1
        return {k: v[rows] for k, v in self.pool.items()}

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])

    def close(self) -> None:
        pass


class FakeTextVAE:
    """A stand-in for Optimus: `encode` maps each sentence to a fixed pseudo-random latent.

    Same interface as the trainer's text VAE slot: `latent_dim`, `encode(texts) -> [B, D]`
    float32 numpy, `decode(latents) -> list[str]`.
    """

    def __init__(self, latent_dim: int, seed: int = 0):
        self.latent_dim, self.seed = latent_dim, seed

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = [
            np.random.default_rng([self.seed, zlib.crc32(str(t).encode())]).standard_normal(
                self.latent_dim
            )
            for t in texts
        ]
        return np.asarray(out, np.float32).reshape(len(out), self.latent_dim)

    def decode(self, latents: np.ndarray) -> list[str]:
        return [f"<latent |z|={np.linalg.norm(z):.2f}>" for z in np.asarray(latents)]
