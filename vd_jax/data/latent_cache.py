"""Caching pass: precomputed latents / contexts written as a TFDS array_record dataset.

Encoding images with the VAE and captions with CLIP / Optimus costs more than a UNet step at
small scale and repeats every epoch; caching the encoder outputs once is the standard speed-up.
The trainer supplies ``encode_fn(batch) -> {name: np.ndarray [B, ...]}`` (e.g.
``image_latent``, ``text_context``, ``image_context``, ``text_latent``); this module writes one
record per example with fixed-shape Tensor features plus the batch's text fields (``caption``,
``key``). `vd_jax.data.input_pipeline.create_iterator` reads the result with
``data_config.name = report["tfds_name"]`` and yields the stored arrays stacked per batch.

Feed one deterministic pass, e.g. an input-pipeline iterator with ``num_epochs=1``,
``shuffle=False``, ``random_crop=False``, ``drop_remainder=False``: keys must be unique, and
the cached latents freeze the crop (no random-crop augmentation when training from the cache).
VAE latents can be stored as the distribution's mean and std to resample per step.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vd_jax.data.tfds_builder import LocalBuilder

Batch = Mapping[str, Any]
EncodeFn = Callable[[Batch], Mapping[str, Any]]
INFO_FILE = "latent_cache.json"


@dataclasses.dataclass
class LatentCacheConfig(tfds.core.BuilderConfig):
    """Feature layout of one cache.

    Attributes:
        array_specs: ``((name, shape, dtype name), ...)`` of the per-example arrays.
        text_fields: Batch fields copied as text (missing ones are stored as ``""``).
    """

    array_specs: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    text_fields: tuple[str, ...] = ("caption", "key")


class LatentCache(LocalBuilder):
    """Writes encoder outputs per example; see module docstring. Use `write_latent_cache`.

    Reading needs no instance of this class: ``tfds.builder_from_directory`` restores the
    features from the files written next to the data.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []

    def __init__(self, *, split_batches: Mapping[str, Iterable[Batch]] | None = None, **kwargs):
        self._split_batches = split_batches or {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            name: tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))
            for name, shape, dtype in self.builder_config.array_specs
        }
        features.update({name: tfds.features.Text() for name in self.builder_config.text_fields})
        return tfds.core.DatasetInfo(
            builder=self,
            description="Precomputed encoder outputs (latents / contexts) per example.",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(split, batches)
            for split, batches in self._split_batches.items()
        }

    def _generate_examples(self, split: str, batches: Iterable[Batch]):
        specs = {
            name: (tuple(shape), np.dtype(dtype))
            for name, shape, dtype in self.builder_config.array_specs
        }
        index = 0
        for batch in batches:
            size = len(next(iter(batch.values())))
            for i in range(size):
                example = {}
                for name, (shape, dtype) in specs.items():
                    value = np.asarray(batch[name][i])
                    if value.shape != shape or value.dtype != dtype:
                        raise ValueError(
                            f"{name}: example {index} has {value.shape} {value.dtype}, the cache"
                            f" was laid out for {shape} {dtype} (shapes must be fixed)"
                        )
                    example[name] = value
                for name in self.builder_config.text_fields:
                    example[name] = str(batch[name][i]) if name in batch else ""
                # Keys must be unique; fall back to the running index when no key is given.
                key = example.get("key") or f"{split}/{index:012d}"
                yield key, example
                index += 1


def _encoded_batches(
    batches: Iterable[Batch], encode_fn: EncodeFn, text_fields: tuple[str, ...]
) -> Iterator[dict]:
    """Yields encode_fn's arrays plus the batch's text fields (only those get stored)."""
    for batch in batches:
        encoded = {k: np.asarray(v) for k, v in encode_fn(batch).items()}
        clash = set(encoded) & set(text_fields)
        if clash:
            raise ValueError(f"encode_fn outputs {sorted(clash)} clash with text_fields")
        yield {**{k: batch[k] for k in text_fields if k in batch}, **encoded}


def write_latent_cache(
    batches: Iterable[Batch] | Mapping[str, Iterable[Batch]],
    encode_fn: EncodeFn,
    data_dir: str,
    *,
    name: str,
    text_fields: tuple[str, ...] = ("caption", "key"),
    overwrite: bool = False,
) -> dict:
    """Encodes every batch once and writes the outputs as a TFDS dataset.

    Args:
        batches: Batches (dicts with at least the fields ``encode_fn`` reads, e.g. ``image``
            and ``caption``), or ``{split: batches}``; a plain iterable becomes ``train``.
        encode_fn: ``batch -> {name: array [B, ...]}``; shapes and dtypes must be the same for
            every batch (the first batch fixes the layout).
        data_dir: TFDS data dir; the cache goes to ``data_dir/latent_cache/<name>/1.0.0``.
        name: Config name (letters, digits, ``_-.``).
        text_fields: Batch fields stored as text next to the arrays.
        overwrite: Rebuild if the cache exists; otherwise its saved info is returned.

    Returns:
        ``{"tfds_name", "dataset_dir", "num_examples": {split: n}, "arrays": {name: [shape,
        dtype]}}``, also saved as ``dataset_dir/latent_cache.json``.
    """
    split_batches = dict(batches) if isinstance(batches, Mapping) else {"train": batches}
    encoded = {s: _encoded_batches(b, encode_fn, text_fields) for s, b in split_batches.items()}
    # Peek at the first encoded batch to lay out the features, then put it back in front.
    first_split = next(iter(encoded))
    try:
        first = next(encoded[first_split])
    except StopIteration:
        raise ValueError(f"split {first_split!r} has no batches") from None
    encoded[first_split] = itertools.chain([first], encoded[first_split])
    specs = tuple(
        (k, tuple(int(d) for d in v.shape[1:]), v.dtype.name)
        for k, v in sorted(first.items())
        if k not in text_fields
    )
    config = LatentCacheConfig(name=name, array_specs=specs, text_fields=tuple(text_fields))
    builder = LatentCache(data_dir=data_dir, config=config, split_batches=encoded)
    dataset_dir = os.fspath(builder.data_dir)
    info_path = os.path.join(dataset_dir, INFO_FILE)
    if os.path.exists(dataset_dir):
        if not overwrite:
            if not os.path.exists(info_path):
                raise FileExistsError(f"{dataset_dir} exists without {INFO_FILE}; overwrite?")
            with open(info_path) as f:
                return {**json.load(f), "reused": True}
        shutil.rmtree(dataset_dir)
        builder = LatentCache(data_dir=data_dir, config=config, split_batches=encoded)
    builder.download_and_prepare(file_format="array_record")
    info = {
        "tfds_name": f"{builder.name}/{name}",
        "data_dir": os.fspath(data_dir),
        "dataset_dir": dataset_dir,
        "num_examples": {s: int(v.num_examples) for s, v in builder.info.splits.items()},
        "arrays": {k: [list(shape), dtype] for k, shape, dtype in specs},
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info
