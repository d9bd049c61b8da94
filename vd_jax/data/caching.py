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

At scale, N processes (e.g. one per host of a pod) build one cache together
(``num_shards=N``, ``shard_index=I``): each split of n source records is cut into contiguous
files of about ``examples_per_file`` records, as many per process, and process I encodes
records ``[n*I//N, n*(I+1)//N)``. The contexts are stored in bfloat16 by default
(``context_dtype``), latents in float32. See `vd_jax.data.latent_cache` for the files, the
done-markers and how the last process to finish joins the shards into one TFDS dataset.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from vd_jax import flows as vd_flows
from vd_jax import xla_options
from vd_jax.data import input_pipeline, latent_cache
from vd_jax.data.encoders import build_encoders

CONTEXT_DTYPES = ("bfloat16", "float32")


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


def default_name(source_name: str, image_size: int) -> str:
    """``<source config name>_<image_size>``, e.g. ``laion_256`` for ``captioned_images/laion``."""
    parts = source_name.strip("/").split("/")
    return f"{parts[1] if len(parts) > 1 else parts[0]}_{image_size}"


def file_ranges(num_records: int, num_shards: int, examples_per_file: int) -> list[range]:
    """The source records of each data file of a split, contiguous and in order.

    The number of files is a multiple of ``num_shards`` (at least one file per shard, about
    ``examples_per_file`` records each), so every shard gets as many files and any process can
    name every file without asking the others.
    """
    per_shard = max(1, -(-num_records // (examples_per_file * num_shards)))
    n = per_shard * num_shards
    return [range(num_records * j // n, num_records * (j + 1) // n) for j in range(n)]


def shard_files(num_files: int, num_shards: int, shard_index: int) -> range:
    """The files of shard ``shard_index``: a contiguous block, so a contiguous record range."""
    per_shard = num_files // num_shards
    return range(shard_index * per_shard, (shard_index + 1) * per_shard)


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
    num_shards: int = 1,
    shard_index: int = 0,
    context_dtype: str = "bfloat16",
    examples_per_file: int = 1024,
) -> dict:
    """Encodes a captioned-images dataset once and writes a latent cache (module docstring).

    With ``num_shards=N``, N processes (``shard_index`` 0..N-1, the same other arguments)
    build one cache together: process I encodes records ``[n*I//N, n*(I+1)//N)`` of every
    source split of n records, writes its data files and a done-marker; whichever process
    finds all N markers after writing its own joins them (`finalize_latent_cache`).

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
        overwrite: Rebuild: with one shard the whole cache folder is removed first; with
            several, this shard's marker, the finished-cache metadata and data files of any
            other layout. Otherwise a finished cache's info is returned, and a shard whose
            marker exists is not encoded again (reruns resume).
        num_shards: Processes that build the cache together.
        shard_index: This process's part, in ``[0, num_shards)``.
        context_dtype: Storage dtype of ``image_context`` / ``text_context``: ``bfloat16``
            (half the bytes; the trainer reads them exactly) or ``float32``.
        examples_per_file: About this many examples per data file.

    Returns:
        When the cache is finished: the cache info (`latent_cache.finalize`: ``tfds_name``,
        ``data_dir``, ``num_examples``, ``num_bytes``, ``arrays``, ...) plus ``source``,
        ``image_size``, ``context_dtype``, ``skipped`` (records the reader dropped, per split),
        ``train_overrides`` (dotted config fields for training from the cache) and
        ``complete=True``; also saved as ``latent_cache.json`` in the cache folder. Otherwise
        (other shards still running) ``complete=False`` and ``waiting_for`` (their indices).
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, num_shards={num_shards})")
    if context_dtype not in CONTEXT_DTYPES:
        raise ValueError(f"context_dtype {context_dtype!r} not in {CONTEXT_DTYPES}")
    if examples_per_file < 1:
        raise ValueError(f"examples_per_file must be positive, got {examples_per_file}")
    source_name, source_data_dir = _source(config, source_name, source_data_dir, data_dir)
    name = name or default_name(source_name, config.image_size)
    ddir = latent_cache.dataset_dir(data_dir, name)
    if not overwrite and (info := latent_cache.read_info(ddir)) is not None:
        return {**info, "reused": True}  # before loading any encoder
    lengths = _source_splits(source_data_dir, source_name, splits)
    ranges = {s: file_ranges(n, num_shards, examples_per_file) for s, n in lengths.items()}
    extra = {
        "source": {"name": source_name, "data_dir": str(source_data_dir), "splits": list(lengths)},
        "image_size": config.image_size,
        "context_dtype": context_dtype,
        "files": {s: len(r) for s, r in ranges.items()},
    }
    if overwrite:
        _clear(ddir, ranges, shard_index, num_shards)
    marker = latent_cache.read_marker(ddir, shard_index, num_shards)
    if marker is None:
        writer = latent_cache.ShardWriter(ddir, shard_index=shard_index, num_shards=num_shards)
        skipped = _encode_shard(
            config,
            writer,
            (source_name, source_data_dir),
            _shard_work(ranges, num_shards, shard_index),
            context_dtype=context_dtype,
            batch_size=batch_size,
            num_threads=num_threads,
        )
        writer.commit(extra=extra, skipped=skipped)
    elif marker["extra"] != extra:
        raise ValueError(
            f"shard {shard_index} of {ddir} was built with other settings ({marker['extra']}, "
            f"now {extra}): pass --overwrite"
        )
    waiting = _waiting_for(ddir, num_shards, extra)
    if waiting:
        return {
            "tfds_name": f"{latent_cache.BUILDER_NAME}/{name}",
            "data_dir": str(data_dir),
            "dataset_dir": str(ddir),
            "complete": False,
            "shard_index": shard_index,
            "num_shards": num_shards,
            "waiting_for": waiting,
        }
    return finalize_latent_cache(data_dir, name, num_shards)


def finalize_latent_cache(data_dir: str, name: str, num_shards: int = 1) -> dict:
    """Joins the N finished shards of cache ``name``: dataset metadata, then its info file.

    Raises `latent_cache.IncompleteCacheError` naming the shards without a done-marker.
    Running it again on a finished cache rewrites the same files.
    """
    info = latent_cache.finalize(data_dir, name, num_shards)
    info.update(train_overrides=train_overrides(info), complete=True)
    latent_cache.write_info(info)
    return info


def _waiting_for(ddir, num_shards: int, extra: Mapping[str, Any]) -> list[int]:
    """Shards not done with these settings (a marker of other settings is being rebuilt)."""
    markers = [latent_cache.read_marker(ddir, i, num_shards) for i in range(num_shards)]
    return [i for i, m in enumerate(markers) if m is None or m["extra"] != extra]


def _clear(ddir, ranges: Mapping[str, list[range]], shard_index: int, num_shards: int) -> None:
    """``overwrite`` (see `build_latent_cache`): forget this shard and the finished cache."""
    if num_shards == 1:
        if ddir.exists():
            ddir.rmtree()
        return
    latent_cache.unfinish(ddir, shard_index, num_shards)
    # Files of another layout are stale whoever wrote them; this layout's files of other
    # shards may be being written right now and are left alone.
    keep = {
        latent_cache.file_path(ddir, s, j, len(r)).name
        for s, r in ranges.items()
        for j in range(len(r))
    }
    for path in latent_cache.data_files(ddir):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _shard_work(ranges: Mapping[str, list[range]], num_shards: int, shard_index: int) -> list:
    """``(split, file index, files in the split, source records)`` of each file of a shard."""
    return [
        (split, j, len(r), r[j])
        for split, r in ranges.items()
        for j in shard_files(len(r), num_shards, shard_index)
    ]


def _encode_shard(
    config, writer, source, work, *, context_dtype: str, batch_size: int, num_threads: int
) -> dict[str, dict[str, int]]:
    """Encodes and writes the files of ``work``; returns the reader's skip counts per split."""
    dtypes = {f"{kind}_context": context_dtype for kind in ("image", "text")}
    encoder, skipped = None, {}
    desc = f"cache shard {writer.shard_index}/{writer.num_shards}"
    with tqdm(total=sum(len(w[3]) for w in work), unit="img", desc=desc) as bar:
        for split, index, num_files, records in work:
            if not records:  # more files than records: an empty file keeps the numbering
                writer.write_file(split, index, num_files, [])
                continue
            # Built on first use: a shard with no records loads no encoder.
            encoder = encoder or CacheEncoder(config, batch_size=batch_size)
            name = f"{split}[{records.start}:{records.stop}]"
            it = _split_iterator(config, *source, name, batch_size, num_threads)
            try:
                encoded = latent_cache.encode_batches(
                    _counted(it, bar), encoder, array_dtypes=dtypes
                )
                writer.write_file(split, index, num_files, encoded)
                counts = skipped.setdefault(split, {})
                for reason, n in it.stats().items():
                    if reason.startswith("skipped_") and n:
                        counts[reason] = counts.get(reason, 0) + n
            finally:
                it.close()
    return {split: counts for split, counts in skipped.items() if counts}


def _counted(batches: Iterable[dict], bar) -> Iterator[dict]:
    for batch in batches:
        bar.update(len(batch["key"]))
        yield batch


def _source(config, source_name, source_data_dir, data_dir) -> tuple[str, str]:
    """The source dataset's name and TFDS data dir (arguments, else the config's data)."""
    if not source_name:
        data = config.get("data", {})
        if data.get("source") != "tfds" or not data.get("name"):
            raise ValueError("no source dataset: pass source_name (or set config.data.name)")
        source_name = data["name"]
        source_data_dir = source_data_dir or data.get("data_dir") or None
    return source_name, source_data_dir or data_dir


def _source_splits(source_data_dir: str, source_name: str, splits) -> dict[str, int]:
    """``{split: records}`` to encode (default all splits), ``train`` first.

    A source without images or without a requested split raises.
    """
    import tensorflow_datasets as tfds

    source_dir = input_pipeline.resolve_dataset_dir(source_data_dir, source_name)
    source_info = tfds.builder_from_directory(source_dir).info
    if "image" not in source_info.features:
        raise ValueError(f"{source_name} has no 'image' feature: not a captioned-images dataset")
    unknown = sorted(set(splits or ()) - set(source_info.splits))
    if unknown:
        raise ValueError(
            f"{source_name} has no split {unknown} (it has {list(source_info.splits)})"
        )
    names = sorted(splits or list(source_info.splits), key=lambda s: (s != "train", s))
    return {s: int(source_info.splits[s].num_examples) for s in names}


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
