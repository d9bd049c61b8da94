"""Latent caches: precomputed latents / contexts written as a TFDS array_record dataset.

Encoding images with the VAE and captions with CLIP / Optimus costs more than a UNet step at
small scale and repeats every epoch; caching the encoder outputs once is the standard speed-up.
The caller supplies ``encode_fn(batch) -> {name: np.ndarray [B, ...]}`` (e.g.
``image_latent``, ``text_context``, ``image_context``, ``text_latent``); this module writes one
record per example with fixed-shape Tensor features plus the batch's text fields (``caption``,
``key``). `vd_jax.data.input_pipeline.create_iterator` reads the result with
``data_config.name = report["tfds_name"]`` and yields the stored arrays stacked per batch.

Feed one deterministic pass, e.g. an input-pipeline iterator with ``num_epochs=1``,
``shuffle=False``, ``random_crop=False``, ``drop_remainder=False``: keys must be unique, and
the cached latents freeze the crop (no random-crop augmentation when training from the cache).

Storage. Arrays are stored as raw bytes (``tfds.features.Encoding.BYTES``) in the dtype the
caller asks for (``array_dtypes``, e.g. ``{"image_context": "bfloat16"}``; default the encoder's
dtype). TFDS reads ``bfloat16`` back natively as ``ml_dtypes.bfloat16`` arrays: no side
channel is needed, and `decode_record` returns exactly the stored bits.

Shards. A cache may be written by several processes at once (`ShardWriter`): each writes its
own array_record files, named as TFDS names them
(``latent_cache-<split>.array_record-<file>-of-<files>`` in ``data_dir/latent_cache/<name>/
1.0.0``), then a done-marker ``shards/shard-<i>-of-<n>.json`` recording its file lengths. The
marker is written last, so a shard without one is unfinished however many of its files exist.
`finalize` checks that every shard's marker is there and agrees with the others, then writes
``features.json`` and, last, ``dataset_info.json`` (with per-file lengths): until then no
reader (``tfds.builder_from_directory``) sees a dataset. All paths go through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vd_jax.data.tfds_builder import LocalBuilder, write_array_record

Batch = Mapping[str, Any]
EncodeFn = Callable[[Batch], Mapping[str, Any]]
INFO_FILE = "latent_cache.json"
_DESCRIPTION = "Precomputed encoder outputs (latents / contexts) per example."
BUILDER_NAME = "latent_cache"
VERSION = "1.0.0"
SHARDS_DIR = "shards"
_FORMAT = "array_record"
# Written by `finalize`, features.json before dataset_info.json (TFDS's order): a reader that
# finds dataset_info.json finds the rest.
_METADATA_FILES = ("features.json", "dataset_info.json", INFO_FILE)


class IncompleteCacheError(RuntimeError):
    """Some shards of a cache have not finished (no done-marker)."""


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype called ``name``; ``"bfloat16"`` is ml_dtypes' (numpy has none)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass
class LatentCacheConfig(tfds.core.BuilderConfig):
    """Feature layout of one cache.

    Attributes:
        array_specs: ``((name, shape, dtype name), ...)`` of the per-example arrays, sorted.
        text_fields: Batch fields copied as text (missing ones are stored as ``""``).
    """

    array_specs: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    text_fields: tuple[str, ...] = ("caption", "key")


def features(config: LatentCacheConfig) -> tfds.features.FeaturesDict:
    """The TFDS features of a cache laid out as ``config``."""
    # Raw bytes: the one encoding TFDS's numpy-only path has for bfloat16, and decoding is a
    # single np.frombuffer rather than parsing a list of floats.
    out = {
        name: tfds.features.Tensor(
            shape=tuple(shape), dtype=storage_dtype(dtype), encoding=tfds.features.Encoding.BYTES
        )
        for name, shape, dtype in config.array_specs
    }
    out.update({name: tfds.features.Text() for name in config.text_fields})
    return tfds.features.FeaturesDict(out)


class LatentCache(LocalBuilder):
    """The ``latent_cache`` TFDS builder: the caches' name, version and features.

    It writes nothing itself: `write_latent_cache` and `ShardWriter` write the files, so that
    several processes can share one build, and `finalize` the metadata. Reading needs no
    instance either: ``tfds.builder_from_directory`` restores the features from the files
    written next to the data.
    """

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=_DESCRIPTION, features=features(self.builder_config)
        )

    def _split_generators(self, dl_manager):
        raise NotImplementedError("write caches with write_latent_cache or ShardWriter")

    def _generate_examples(self):
        raise NotImplementedError("write caches with write_latent_cache or ShardWriter")


def decode_record(record: Mapping[str, Any]) -> dict:
    """One stored example as the trainer reads it: arrays as numpy, text fields as str.

    Arrays keep their stored dtype (``bfloat16`` contexts come back as ``ml_dtypes.bfloat16``,
    bit for bit what was written).
    """
    return {
        k: v.decode("utf-8", "replace") if isinstance(v, bytes) else np.asarray(v)
        for k, v in record.items()
    }


def iter_examples(batches: Iterable[Batch], config: LatentCacheConfig) -> Iterator[dict]:
    """Splits batches into per-example dicts laid out as ``config`` (shapes checked)."""
    specs = [
        (name, tuple(shape), storage_dtype(dtype)) for name, shape, dtype in config.array_specs
    ]
    index = 0
    for batch in batches:
        arrays = {k: np.asarray(v) for k, v in batch.items() if k not in config.text_fields}
        if set(arrays) != {name for name, _, _ in specs}:
            raise ValueError(
                f"batch arrays {sorted(arrays)} differ from the cache's {[s[0] for s in specs]}"
            )
        for i in range(len(next(iter(arrays.values())))):
            example = {}
            for name, shape, dtype in specs:
                value = arrays[name][i]
                if value.shape != shape or value.dtype != dtype:
                    raise ValueError(
                        f"{name}: example {index} has {value.shape} {value.dtype}, the cache"
                        f" was laid out for {shape} {dtype} (shapes must be fixed)"
                    )
                example[name] = value
            for name in config.text_fields:
                example[name] = str(batch[name][i]) if name in batch else ""
            yield example
            index += 1


def encode_batches(
    batches: Iterable[Batch],
    encode_fn: EncodeFn,
    text_fields: Sequence[str] = ("caption", "key"),
    array_dtypes: Mapping[str, str] | None = None,
) -> Iterator[dict]:
    """Yields ``encode_fn``'s arrays (cast to ``array_dtypes``) plus the batch's text fields."""
    array_dtypes = dict(array_dtypes or {})
    for batch in batches:
        encoded = {k: np.asarray(v) for k, v in encode_fn(batch).items()}
        clash = set(encoded) & set(text_fields)
        if clash:
            raise ValueError(f"encode_fn outputs {sorted(clash)} clash with text_fields")
        for k, dtype in array_dtypes.items():
            if k in encoded:  # round to nearest even, as jnp's astype does
                encoded[k] = encoded[k].astype(storage_dtype(dtype))
        yield {**{k: batch[k] for k in text_fields if k in batch}, **encoded}


def dataset_dir(data_dir: str | epath.Path, name: str) -> epath.Path:
    """The folder of cache ``name``: ``data_dir/latent_cache/<name>/1.0.0``."""
    return epath.Path(data_dir) / BUILDER_NAME / name / VERSION


def file_path(dataset_dir: epath.Path, split: str, index: int, num_files: int) -> epath.Path:
    """Data file ``index`` of ``num_files`` of a split, named as TFDS reads it."""
    template = tfds.core.ShardedFileTemplate(
        data_dir=dataset_dir, dataset_name=BUILDER_NAME, split=split, filetype_suffix=_FORMAT
    )
    return template.sharded_filepath(shard_index=index, num_shards=num_files)


def marker_path(dataset_dir: epath.Path, shard_index: int, num_shards: int) -> epath.Path:
    """The done-marker of one shard."""
    return dataset_dir / SHARDS_DIR / f"shard-{shard_index:05d}-of-{num_shards:05d}.json"


def read_marker(dataset_dir: epath.Path, shard_index: int, num_shards: int) -> dict | None:
    """A finished shard's marker, or None."""
    path = marker_path(dataset_dir, shard_index, num_shards)
    return json.loads(path.read_text()) if path.exists() else None


def missing_shards(dataset_dir: epath.Path, num_shards: int) -> list[int]:
    """Shards of ``num_shards`` without a done-marker."""
    return [i for i in range(num_shards) if not marker_path(dataset_dir, i, num_shards).exists()]


def read_info(dataset_dir: epath.Path) -> dict | None:
    """The saved info of a finished cache, or None."""
    path = dataset_dir / INFO_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_info(info: Mapping[str, Any]) -> None:
    """Saves a finished cache's info (last file of a build: its presence means done)."""
    (epath.Path(info["dataset_dir"]) / INFO_FILE).write_text(json.dumps(info, indent=1))


def unfinish(dataset_dir: epath.Path, shard_index: int, num_shards: int) -> None:
    """Removes the metadata that marks the cache finished and this shard's done-marker."""
    for name in _METADATA_FILES:
        (dataset_dir / name).unlink(missing_ok=True)
    marker_path(dataset_dir, shard_index, num_shards).unlink(missing_ok=True)


def data_files(dataset_dir: epath.Path) -> list[epath.Path]:
    """The cache's data files present in its folder, whatever layout wrote them."""
    if not dataset_dir.exists():
        return []
    return [p for p in dataset_dir.iterdir() if p.name.startswith(f"{BUILDER_NAME}-")]


class ShardWriter:
    """Writes one shard of a cache: its data files, then (`commit`) its done-marker.

    The layout (array names, shapes, dtypes) is taken from the first encoded batch; every
    later one must match. Files are written directly under their final names: the marker, not
    the file, says a shard is done, so a crash leaves nothing that `finalize` accepts.
    """

    def __init__(
        self,
        dataset_dir: epath.Path,
        *,
        shard_index: int = 0,
        num_shards: int = 1,
        text_fields: Sequence[str] = ("caption", "key"),
    ):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
        self.dataset_dir = epath.Path(dataset_dir)
        self.shard_index, self.num_shards = shard_index, num_shards
        self.text_fields = tuple(text_fields)
        self.config: LatentCacheConfig | None = None
        self._features = None
        self._files: dict[str, dict[str, Any]] = {}  # split -> num_files, lengths, num_bytes

    def _lay_out(self, batch: Mapping[str, Any]) -> None:
        specs = tuple(
            (k, tuple(int(d) for d in np.shape(v)[1:]), np.asarray(v).dtype.name)
            for k, v in sorted(batch.items())
            if k not in self.text_fields
        )
        self.config = LatentCacheConfig(
            name=self.dataset_dir.parent.name, array_specs=specs, text_fields=self.text_fields
        )
        self._features = features(self.config)

    def _serialized(self, batches: Iterable[Batch]) -> Iterator[tuple[None, bytes]]:
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        if self.config is None:
            self._lay_out(first)
        for example in iter_examples(itertools.chain([first], batches), self.config):
            yield None, self._features.serialize_example(example)

    def write_file(self, split: str, index: int, num_files: int, batches: Iterable[Batch]) -> int:
        """Writes encoded ``batches`` as data file ``index`` of ``num_files`` of ``split``.

        Returns the number of examples written (0 writes an empty file).
        """
        entry = self._files.setdefault(split, {"num_files": num_files, "lengths": {}})
        if entry["num_files"] != num_files or not 0 <= index < num_files:
            raise ValueError(
                f"{split}: file {index} of {num_files} in a split of {entry['num_files']} files"
            )
        path = file_path(self.dataset_dir, split, index, num_files)
        path.parent.mkdir(parents=True, exist_ok=True)
        counted = _Counted(self._serialized(batches))
        write_array_record(path, counted)
        entry["lengths"][str(index)] = counted.count
        entry["num_bytes"] = entry.get("num_bytes", 0) + path.stat().length
        return counted.count

    def commit(self, *, extra: Mapping[str, Any] | None = None, skipped=None) -> dict:
        """Writes the done-marker: the shard's files, layout, ``extra`` and skip counts."""
        marker = {
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "layout": None if self.config is None else _layout_json(self.config),
            "splits": self._files,
            "skipped": dict(skipped or {}),
            "extra": dict(extra or {}),
        }
        path = marker_path(self.dataset_dir, self.shard_index, self.num_shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(marker, indent=1))
        return marker


class _Counted:
    """An iterable that counts what it yields (the file adapter returns no count)."""

    def __init__(self, items: Iterable):
        self._items, self.count = items, 0

    def __iter__(self):
        for item in self._items:
            self.count += 1
            yield item


def _layout_json(config: LatentCacheConfig) -> dict:
    return {
        "arrays": {name: [list(shape), dtype] for name, shape, dtype in config.array_specs},
        "text_fields": list(config.text_fields),
    }


def _agreed(markers: Sequence[dict], field: str, dataset_dir: epath.Path) -> Any:
    """The value of ``field`` that every marker holding one gives (else a clear error)."""
    values = {}
    for m in markers:
        if m[field] is not None:
            values.setdefault(json.dumps(m[field], sort_keys=True), []).append(m["shard_index"])
    if len(values) > 1:
        shown = "; ".join(f"shards {v}: {k}" for k, v in values.items())
        raise ValueError(f"{dataset_dir}: shards disagree on {field}: {shown}")
    return json.loads(next(iter(values))) if values else None


def _split_lengths(markers: Sequence[dict], dataset_dir: epath.Path) -> dict[str, dict]:
    """``{split: {"lengths": [per file], "num_bytes": n}}`` from all markers; every file once."""
    out: dict[str, dict] = {}
    for m in markers:
        for split, entry in m["splits"].items():
            s = out.setdefault(split, {"num_files": entry["num_files"], "by_file": {}, "bytes": 0})
            if s["num_files"] != entry["num_files"]:
                raise ValueError(f"{dataset_dir}: shards disagree on the files of {split!r}")
            for index, length in entry["lengths"].items():
                if int(index) in s["by_file"]:
                    raise ValueError(f"{dataset_dir}: {split} file {index} written twice")
                s["by_file"][int(index)] = length
            s["bytes"] += entry.get("num_bytes", 0)
    for split, s in out.items():
        absent = sorted(set(range(s["num_files"])) - set(s["by_file"]))
        if absent:
            raise ValueError(f"{dataset_dir}: {split} files {absent} written by no shard")
        if not sum(s["by_file"].values()):
            raise ValueError(f"{dataset_dir}: split {split!r} has no examples (all skipped?)")
    return {
        split: {
            "lengths": [s["by_file"][i] for i in range(s["num_files"])],
            "num_bytes": s["bytes"],
        }
        for split, s in out.items()
    }


def _check_files(dataset_dir: epath.Path, splits: Mapping[str, dict]) -> None:
    """Every listed data file is present, and no file of another layout is."""
    expected = {
        file_path(dataset_dir, split, i, len(s["lengths"])).name
        for split, s in splits.items()
        for i in range(len(s["lengths"]))
    }
    present = {p.name for p in data_files(dataset_dir)}
    if expected - present:
        raise FileNotFoundError(f"{dataset_dir}: data files missing: {sorted(expected - present)}")
    if present - expected:
        raise ValueError(
            f"{dataset_dir}: data files of another build layout (other --num_shards or "
            f"--examples_per_file?): {sorted(present - expected)[:5]}; rebuild with --overwrite"
        )


def _sum_skipped(markers: Sequence[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in markers:
        for split, counts in m["skipped"].items():
            total = out.setdefault(split, {})
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
    return out


def finalize(data_dir: str | epath.Path, name: str, num_shards: int) -> dict:
    """Joins the finished shards of cache ``name`` into one TFDS dataset.

    Raises `IncompleteCacheError` (naming the shards) when a shard has no done-marker, and
    ``ValueError`` when the shards disagree (layout, files, ``extra``); nothing is written then.

    Returns:
        The cache info: ``tfds_name``, ``data_dir``, ``dataset_dir``, ``num_examples`` and
        ``num_bytes`` per split, ``arrays`` (``{name: [shape, dtype]}``), ``num_shards``,
        ``skipped`` (summed over shards) and the shards' ``extra`` fields. Not yet saved
        (`write_info`).
    """
    ddir = dataset_dir(data_dir, name)
    missing = missing_shards(ddir, num_shards)
    if missing:
        raise IncompleteCacheError(
            f"{ddir}: shards {missing} of {num_shards} have not finished (no done-marker in "
            f"{ddir / SHARDS_DIR}); run them (--shard_index=...), then finalize again"
        )
    markers = [read_marker(ddir, i, num_shards) for i in range(num_shards)]
    layout = _agreed(markers, "layout", ddir)
    if layout is None:
        raise ValueError(f"{ddir}: no shard wrote any example")
    extra = _agreed(markers, "extra", ddir)
    splits = _split_lengths(markers, ddir)
    _check_files(ddir, splits)
    config = LatentCacheConfig(
        name=name,
        array_specs=tuple((k, tuple(s), d) for k, (s, d) in layout["arrays"].items()),
        text_fields=tuple(layout["text_fields"]),
    )
    tfds.folder_dataset.write_metadata(
        data_dir=ddir,
        features=features(config),
        split_infos=[
            tfds.core.SplitInfo(name=split, shard_lengths=s["lengths"], num_bytes=s["num_bytes"])
            for split, s in splits.items()
        ],
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=ddir, dataset_name=BUILDER_NAME, filetype_suffix=_FORMAT
        ),
        check_data=False,  # it would read through tf.data
        description=_DESCRIPTION,
    )
    return {
        "tfds_name": f"{BUILDER_NAME}/{name}",
        "data_dir": str(data_dir),
        "dataset_dir": str(ddir),
        "num_examples": {split: sum(s["lengths"]) for split, s in splits.items()},
        "num_bytes": {split: s["num_bytes"] for split, s in splits.items()},
        "arrays": layout["arrays"],
        "num_shards": num_shards,
        "skipped": _sum_skipped(markers),
        **extra,
    }


def write_latent_cache(
    batches: Iterable[Batch] | Mapping[str, Iterable[Batch]],
    encode_fn: EncodeFn,
    data_dir: str,
    *,
    name: str,
    text_fields: tuple[str, ...] = ("caption", "key"),
    overwrite: bool = False,
    array_dtypes: Mapping[str, str] | None = None,
) -> dict:
    """Encodes every batch once, in this process, and writes the outputs as a TFDS dataset.

    Args:
        batches: Batches (dicts with at least the fields ``encode_fn`` reads, e.g. ``image``
            and ``caption``), or ``{split: batches}``; a plain iterable becomes ``train``.
        encode_fn: ``batch -> {name: array [B, ...]}``; shapes and dtypes must be the same for
            every batch (the first batch fixes the layout).
        data_dir: TFDS data dir; the cache goes to ``data_dir/latent_cache/<name>/1.0.0``.
        name: Config name (letters, digits, ``_-.``).
        text_fields: Batch fields stored as text next to the arrays.
        overwrite: Rebuild if the cache exists; otherwise its saved info is returned.
        array_dtypes: Store these outputs in these dtypes (e.g. ``{"text_context":
            "bfloat16"}``); others keep ``encode_fn``'s dtype.

    Returns:
        The `finalize` info (``tfds_name``, ``dataset_dir``, ``num_examples``, ``arrays``, ...),
        also saved as ``dataset_dir/latent_cache.json``.
    """
    split_batches = dict(batches) if isinstance(batches, Mapping) else {"train": batches}
    ddir = dataset_dir(data_dir, name)
    if ddir.exists():
        if not overwrite:
            info = read_info(ddir)
            if info is None:
                raise FileExistsError(f"{ddir} exists without {INFO_FILE}; overwrite?")
            return {**info, "reused": True}
        ddir.rmtree()
    writer = ShardWriter(ddir, text_fields=text_fields)
    for split, split_batch_iter in split_batches.items():
        encoded = encode_batches(split_batch_iter, encode_fn, text_fields, array_dtypes)
        if not writer.write_file(split, 0, 1, encoded):
            raise ValueError(f"split {split!r} has no batches")
    writer.commit()
    info = finalize(data_dir, name, 1)
    write_info(info)
    return info
