"""Latent caching: encode a captioned-images dataset once with a training config's encoders.

`build_latent_cache(config, data_dir=..., source_name=...)` reads every example of a
``captioned_images/<name>`` TFDS dataset (see `vd_jax.data.captioned_images`) in one
deterministic pass (stored order, center crop to ``config.image_size``, one epoch, the last short
batch kept), encodes it with the frozen encoders the config trains with
(`vd_jax.data.encoders.build_encoders`: the VAE / CLIP / Optimus of ``encoders.folder`` for
``encoders.source='pretrained'``, the tiny random ones for ``'random'``) and writes a latent cache
(`vd_jax.data.latent_cache`) holding what the config's flows need
(`vd_jax.flows.needed_inputs`): ``image_latent`` (the VAE posterior mean, scaled as the
diffuser sees it), ``image_context`` / ``text_context`` (CLIP) and ``text_latent`` (the text
VAE's mean), plus ``caption`` and ``key``.

The encoders are built as the trainer builds them (same seed, so random test encoders match a
training run's), except that ``encoders.on_the_fly`` is forced on: the cache needs the CLIP
towers that a latents-only training run leaves out. Training from the cache then uses the
returned ``train_overrides`` (``data.name``, ``data.data_dir``, context lengths, ...).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from vd_jax import flows as vd_flows
from vd_jax import xla_options
from vd_jax.data import input_pipeline, latent_cache
from vd_jax.data.encoders import build_encoders


def encoding_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the training config whose encoders can make every input (CLIP towers on)."""
    config = copy.deepcopy(config)
    config.encoders.on_the_fly = True
    return config


def encoder_rng(config) -> jax.Array:
    """The key the trainer builds its frozen encoders from (so random ones match a run's)."""
    return jax.random.fold_in(jax.random.key(config.seed), 7)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 to ``size`` by repeating the last row (valid inputs; the rows are cut)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


class CacheEncoder:
    """``batch -> {name: np.ndarray [B, ...]}``: the frozen encoders under one `jax.jit`.

    Captions are tokenized / text-VAE-encoded on the host (`FrozenEncoders.host_prepare`);
    images and token ids go through the VAE and CLIP towers in one compiled function. Short
    batches are padded to ``batch_size`` and the outputs cut, so one shape is compiled. The
    batch is split over the largest number of local devices that divides ``batch_size``.

    Attributes:
        encoders: The `vd_jax.data.encoders.FrozenEncoders`.
        needed: The cached entries (`vd_jax.flows.needed_inputs` of the config's flows).
        batch_size: The one compiled batch size.
    """

    def __init__(self, config, *, batch_size: int, devices: Sequence[jax.Device] | None = None):
        config = encoding_config(config)
        flows = vd_flows.check(config.flows.keys(), trainable=True)
        self.needed = vd_flows.needed_inputs(flows)
        self.batch_size = batch_size
        self.encoders = build_encoders(config, flows, encoder_rng(config))
        devices = list(devices or jax.local_devices())
        n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
        mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("batch",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        self._frozen = jax.device_put(self.encoders.params, rep)
        needed, encoders = frozenset(self.needed), self.encoders

        def encode(frozen, batch):
            # rng=None: `encode_images` returns the VAE posterior mean, not a sample.
            return encoders.encode(frozen, batch, None, set(needed))[0]

        self._fn = xla_options.jit(encode, in_shardings=(rep, split), out_shardings=rep)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        prepared = self.encoders.host_prepare(dict(batch), self.needed)
        n = len(next(iter(prepared.values())))
        if n > self.batch_size:
            raise ValueError(f"batch of {n} exceeds the compiled batch size {self.batch_size}")
        padded = {k: _pad(v, self.batch_size) for k, v in prepared.items()}
        out = jax.device_get(self._fn(self._frozen, padded))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def _progress(it: input_pipeline.InputIterator, desc: str) -> Iterator[dict]:
    with tqdm(total=it.records_per_epoch, unit="img", desc=desc) as bar:
        for batch in it:
            bar.update(len(batch["key"]))
            yield batch


def train_overrides(info: Mapping[str, Any]) -> dict[str, Any]:
    """Training-config fields (dotted) that read a latent cache described by ``info``."""
    arrays = info["arrays"]
    out = {
        "data.source": "tfds",
        "data.name": info["tfds_name"],
        "data.data_dir": info["data_dir"],
        "encoders.on_the_fly": False,
    }
    if "image_latent" in arrays:
        out["latent_size"] = arrays["image_latent"][0][0]
    for kind in ("text", "image"):
        if f"{kind}_context" in arrays:
            out[f"encoders.{kind}_context_len"] = arrays[f"{kind}_context"][0][0]
    return out


def build_latent_cache(
    config: ml_collections.ConfigDict,
    *,
    data_dir: str,
    source_name: str | None = None,
    source_data_dir: str | None = None,
    name: str | None = None,
    splits: Sequence[str] | None = None,
    batch_size: int = 64,
    num_threads: int = 8,
    overwrite: bool = False,
) -> dict:
    """Encodes a captioned-images dataset once and writes a latent cache (module docstring).

    Args:
        config: A training config (``configs/*.py``); its flows, encoders, ``image_size`` and
            ``seed`` are used.
        data_dir: TFDS data dir the cache is written to (``latent_cache/<name>/1.0.0``).
        source_name: The captioned-images dataset, as a build report's ``tfds_name`` (e.g.
            ``captioned_images/laion``); default ``config.data.name`` when ``data.source`` is
            ``'tfds'``.
        source_data_dir: TFDS data dir of the source (default ``data_dir``).
        name: Cache name (default ``<source name>_<image_size>``).
        splits: Source splits to encode (default all; ``train`` first).
        batch_size: Examples per encoder call (the one compiled shape).
        num_threads: Threads that read and decode images.
        overwrite: Rebuild an existing cache; otherwise its saved info is returned.

    Returns:
        The cache info (`latent_cache.write_latent_cache`: ``tfds_name``, ``data_dir``,
        ``num_examples``, ``arrays``) plus ``source``, ``image_size``, ``skipped`` (records the
        reader dropped, per split) and ``train_overrides`` (dotted config fields for training
        from the cache). Also saved as ``latent_cache.json`` in the cache folder.
    """
    source_name, source_data_dir = _source(config, source_name, source_data_dir, data_dir)
    if not name:
        parts = source_name.strip("/").split("/")
        name = f"{parts[1] if len(parts) > 1 else parts[0]}_{config.image_size}"
    version = str(latent_cache.LatentCache.VERSION)
    info_path = os.path.join(data_dir, "latent_cache", name, version, latent_cache.INFO_FILE)
    if os.path.exists(info_path) and not overwrite:  # before loading any encoder
        with open(info_path) as f:
            return {**json.load(f), "reused": True}
    splits = _source_splits(source_data_dir, source_name, splits)
    encoder = CacheEncoder(config, batch_size=batch_size)
    iterators = {}
    try:
        for split in splits:
            iterators[split] = _split_iterator(
                config, source_name, source_data_dir, split, batch_size, num_threads
            )
        batches = {s: _progress(it, f"cache {s}") for s, it in iterators.items()}
        info = latent_cache.write_latent_cache(
            batches, encoder, data_dir, name=name, overwrite=overwrite
        )
        skipped = {
            s: {k: v for k, v in it.stats().items() if k.startswith("skipped_") and v}
            for s, it in iterators.items()
        }
        skipped = {s: v for s, v in skipped.items() if v}
    finally:
        for it in iterators.values():
            it.close()
    info.update(
        source={"name": source_name, "data_dir": source_data_dir, "splits": splits},
        image_size=config.image_size,
        skipped=skipped,
        train_overrides=train_overrides(info),
    )
    with open(os.path.join(info["dataset_dir"], latent_cache.INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _source(config, source_name, source_data_dir, data_dir) -> tuple[str, str]:
    """The source dataset's name and TFDS data dir (arguments, else the config's data)."""
    if not source_name:
        data = config.get("data", {})
        if data.get("source") != "tfds" or not data.get("name"):
            raise ValueError("no source dataset: pass source_name (or set config.data.name)")
        source_name = data["name"]
        source_data_dir = source_data_dir or data.get("data_dir") or None
    return source_name, source_data_dir or data_dir


def _source_splits(source_data_dir: str, source_name: str, splits) -> list[str]:
    """The splits to encode (default all), ``train`` first; a source without images raises."""
    import tensorflow_datasets as tfds

    source_dir = input_pipeline.resolve_dataset_dir(source_data_dir, source_name)
    source_info = tfds.builder_from_directory(source_dir).info
    if "image" not in source_info.features:
        raise ValueError(f"{source_name} has no 'image' feature: not a captioned-images dataset")
    return sorted(splits or list(source_info.splits), key=lambda s: (s != "train", s))


def _split_iterator(config, source_name, source_data_dir, split, batch_size, num_threads):
    """One deterministic pass over a split: stored order, centre crops, the last short batch."""
    data_config = ml_collections.ConfigDict(
        dict(
            source="tfds",
            name=source_name,
            data_dir=source_data_dir,
            split=split,
            shuffle=False,
            num_epochs=1,
            random_crop=False,
            random_flip=False,
            min_size=0,
            num_threads=num_threads,
        )
    )
    return input_pipeline.create_iterator(
        data_config,
        batch_size_per_host=batch_size,
        image_size=config.image_size,
        drop_remainder=False,
    )
