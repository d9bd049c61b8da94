"""TFDS builder for captioned images from a local folder or webdataset ``.tar`` shards.

Both sources become the same TFDS dataset (array_record files, read back by random access with
``tfds.builder_from_directory(dir).as_data_source(split)``; TensorFlow is never imported).
Features: ``image`` (the original encoded bytes, untouched), ``caption``, ``key``, ``width`` /
``height`` (decoded size) and ``original_width`` / ``original_height`` (from img2dataset's
``KEY.json`` when present, else the decoded size). ``tfds.features.Image`` is not used because it
needs TensorFlow; readers decode ``image`` with Pillow.

Folder layout: ``*.jpg|jpeg|png|webp`` anywhere under the folder, captioned per image by
``stem.txt``, else ``stem.json`` (field ``caption`` or ``text``), else a ``captions.csv`` /
``metadata.csv`` at the folder root (a file column ``file_name|image|file|filename|path``
relative to the folder, a text column ``caption|text``). Keys are relative paths.

Webdataset layout (img2dataset output): shards with consecutive ``KEY.jpg`` + ``KEY.txt``
(+ optional ``KEY.json`` with a caption and ``original_width`` / ``original_height``).

Every candidate is fully decoded once before writing, because TFDS refuses empty splits and the
report should be complete before anything is written. Checks, in order: no caption, corrupt
(Pillow cannot decode it), too small (shorter side < ``min_size``), duplicate key. Skipped keys
are listed in the report, which is also saved as ``build_report.json`` in the dataset folder.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from vd_jax.convert.load import copy_tree
from vd_jax.data.tfds_builder import LocalBuilder, is_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REPORT_FILE = "build_report.json"
SKIP_REASONS = ("no_caption", "corrupt", "too_small", "duplicate")
_CSV_NAMES = ("captions.csv", "metadata.csv")
_CSV_FILE_COLUMNS = ("file_name", "image", "file", "filename", "path")
_TEXT_FIELDS = ("caption", "text")


@dataclasses.dataclass
class CaptionedImagesConfig(tfds.core.BuilderConfig):
    """Where a `CaptionedImages` build reads from (one config per built dataset).

    Attributes:
        source_kind: ``"folder"`` or ``"webdataset"``.
        sources: The folder (one path) or the ``.tar`` shard paths.
        min_size: Skip images whose shorter side is below this (0 = keep all).
        val_fraction: Fraction of keys (by hash, so stable) written to ``validation``.
        num_threads: Threads that decode images during the checking pass.
    """

    source_kind: str = "folder"
    sources: tuple[str, ...] = ()
    min_size: int = 0
    val_fraction: float = 0.0
    num_threads: int = 8


@dataclasses.dataclass
class _Sample:
    key: str
    caption: str | None
    data: bytes | None  # encoded image; None once checked, to free memory
    locator: Any  # file path (folder) or (shard, member name) (webdataset)
    original_size: tuple[int, int] | None = None


def image_size(data: bytes) -> tuple[int, int]:
    """Fully decodes encoded image bytes and returns (width, height); raises if unreadable."""
    with Image.open(io.BytesIO(data)) as im:
        # A header-only open misses truncated files; load() decodes every pixel.
        im.load()
        return im.size


def _clean_caption(text: Any) -> str | None:
    text = str(text).strip() if text is not None else ""
    return text or None


def _json_caption(raw: bytes) -> tuple[str | None, dict]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, {}
    if not isinstance(meta, dict):
        return None, {}
    for field in _TEXT_FIELDS:
        if _clean_caption(meta.get(field)):
            return _clean_caption(meta[field]), meta
    return None, meta


def _read_csv_captions(root: str) -> dict[str, str]:
    for csv_name in _CSV_NAMES:
        path = os.path.join(root, csv_name)
        if not os.path.exists(path):
            continue
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = {c.strip().lower(): c for c in reader.fieldnames or ()}
            file_col = next((columns[c] for c in _CSV_FILE_COLUMNS if c in columns), None)
            text_col = next((columns[c] for c in _TEXT_FIELDS if c in columns), None)
            if file_col is None or text_col is None:
                raise ValueError(f"{path}: need a file and a caption column, got {list(columns)}")
            return {
                posixpath.normpath(row[file_col].strip().replace(os.sep, "/")): row[text_col]
                for row in reader
                if row.get(file_col)
            }
    return {}


def _scan_folder(root: str) -> Iterator[_Sample]:
    csv_captions = _read_csv_captions(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # os.walk order is filesystem-dependent; sorting keeps builds stable
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext[1:].lower() not in IMAGE_EXTENSIONS or filename.startswith("."):
                continue
            path = os.path.join(dirpath, filename)
            key = os.path.relpath(path, root).replace(os.sep, "/")
            caption = None
            txt, js = os.path.join(dirpath, stem + ".txt"), os.path.join(dirpath, stem + ".json")
            if os.path.exists(txt):
                with open(txt, encoding="utf-8", errors="replace") as f:
                    caption = _clean_caption(f.read())
            if caption is None and os.path.exists(js):
                with open(js, "rb") as f:
                    caption = _json_caption(f.read())[0]
            if caption is None:
                caption = _clean_caption(csv_captions.get(key))
            with open(path, "rb") as f:
                yield _Sample(key, caption, f.read(), path)


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """Yields (key, {extension: (member name, bytes)}) per webdataset sample, in shard order."""
    # Streaming mode ('r|*'): shards may be large or compressed; samples are consecutive.
    with tarfile.open(path, "r|*") as tar:
        key, parts = None, {}
        for member in tar:
            dirname, base = posixpath.split(member.name)
            if not member.isfile() or base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            member_key = posixpath.join(dirname, stem)
            if member_key != key and parts:
                yield key, parts
                parts = {}
            key = member_key
            parts[ext.lower()] = (member.name, tar.extractfile(member).read())
        if parts:
            yield key, parts


def _tar_sample(shard: str, key: str, parts: dict[str, tuple[str, bytes]]) -> _Sample:
    caption = _clean_caption(parts["txt"][1].decode("utf-8", "replace")) if "txt" in parts else None
    json_caption, meta = _json_caption(parts["json"][1]) if "json" in parts else (None, {})
    original = (meta.get("original_width"), meta.get("original_height"))
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    member, data = parts[ext] if ext else (None, b"")  # no image part: counted as corrupt
    return _Sample(
        key,
        caption or json_caption,
        data,
        (shard, member),
        original if all(isinstance(v, int) for v in original) else None,
    )


def _scan_webdataset(shards: Sequence[str], errors: list[str]) -> Iterator[_Sample]:
    for shard in shards:
        try:
            for key, parts in iter_tar_samples(shard):
                yield _tar_sample(shard, key, parts)
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated or unreadable shard loses its remaining samples, not the whole build.
            errors.append(f"{shard}: {type(e).__name__}: {e}")


def _bounded_map(fn: Callable, items: Iterable, pool: concurrent.futures.Executor, window: int):
    """Like pool.map but keeps at most `window` items in flight (bounded memory), in order."""
    pending = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item, fut = pending.popleft()
            yield item, fut.result()
    while pending:
        item, fut = pending.popleft()
        yield item, fut.result()


def _check(sample: _Sample) -> tuple[int, int] | None:
    if sample.caption is None:
        return None
    try:
        return image_size(sample.data)
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad data; all mean corrupt
        return None


def _plan(config: CaptionedImagesConfig) -> tuple[dict, dict[str, list[dict]]]:
    """Checks every candidate; returns (report, {split: [entries to write]})."""
    errors: list[str] = []
    if config.source_kind == "folder":
        samples = _scan_folder(config.sources[0])
    elif config.source_kind == "webdataset":
        samples = _scan_webdataset(config.sources, errors)
    else:
        raise ValueError(f"unknown source_kind {config.source_kind!r}")
    skipped = {reason: [] for reason in SKIP_REASONS}
    plan: dict[str, list[dict]] = {"train": [], "validation": []}
    seen = set()
    window = max(4 * config.num_threads, 16)
    with concurrent.futures.ThreadPoolExecutor(config.num_threads) as pool:
        for sample, size in _bounded_map(_check, samples, pool, window):
            sample.data = None
            if sample.caption is None:
                skipped["no_caption"].append(sample.key)
            elif size is None:
                skipped["corrupt"].append(sample.key)
            elif min(size) < config.min_size:
                skipped["too_small"].append(sample.key)
            elif sample.key in seen:
                skipped["duplicate"].append(sample.key)
            else:
                seen.add(sample.key)
                digest = hashlib.md5(sample.key.encode("utf-8")).hexdigest()
                split = (
                    "validation" if int(digest[:8], 16) < config.val_fraction * 2**32 else "train"
                )
                original = sample.original_size or size
                plan[split].append(
                    {
                        "key": sample.key,
                        "caption": sample.caption,
                        "width": size[0],
                        "height": size[1],
                        "original_width": original[0],
                        "original_height": original[1],
                        "locator": sample.locator,
                    }
                )
    report = {
        "source_kind": config.source_kind,
        "sources": list(config.sources),
        "min_size": config.min_size,
        "val_fraction": config.val_fraction,
        "written": sum(len(v) for v in plan.values()),
        "written_per_split": {k: len(v) for k, v in plan.items() if v},
        **{f"skipped_{reason}": len(keys) for reason, keys in skipped.items()},
        "skipped_keys": {reason: sorted(keys) for reason, keys in skipped.items()},
        "errors": errors,
    }
    return report, {k: v for k, v in plan.items() if v}


class CaptionedImages(LocalBuilder):
    """Captioned images (folder or webdataset shards) as a TFDS dataset; see module docstring.

    Configs are made per build (``config=CaptionedImagesConfig(name=..., ...)``); data lands in
    ``data_dir/captioned_images/<config name>/<version>``. After `download_and_prepare`,
    ``builder.build_report`` holds the report.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []

    def _info(self) -> tfds.core.DatasetInfo:
        scalar = tfds.features.Scalar(dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned images; `image` holds the original encoded bytes.",
            features=tfds.features.FeaturesDict(
                {
                    # Encoded bytes as a string tensor: tfds.features.Image would need TF.
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                    "width": scalar,
                    "height": scalar,
                    "original_width": scalar,
                    "original_height": scalar,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local sources only
        self.build_report, plan = _plan(self.builder_config)
        if not plan:
            raise ValueError(f"no usable examples: {json.dumps(self.build_report)}")
        return {split: self._generate_examples(entries) for split, entries in plan.items()}

    def _generate_examples(self, entries: list[dict]):
        if self.builder_config.source_kind == "folder":
            for entry in entries:
                with open(entry["locator"], "rb") as f:
                    yield entry["key"], self._example(entry, f.read())
            return
        wanted = collections.defaultdict(dict)
        for entry in entries:
            shard, member = entry["locator"]
            wanted[shard][member] = entry
        for shard in self.builder_config.sources:
            if not wanted[shard]:
                continue
            try:
                for _, parts in iter_tar_samples(shard):
                    for member, data in parts.values():
                        if member in wanted[shard]:
                            entry = wanted[shard][member]
                            yield entry["key"], self._example(entry, data)
            except (tarfile.TarError, OSError, EOFError):
                pass  # a damaged tail: planned samples all come before it; reported already

    @staticmethod
    def _example(entry: dict, data: bytes) -> dict:
        fields = ("caption", "key", "width", "height", "original_width", "original_height")
        return {"image": data, **{f: entry[f] for f in fields}}


def _build(config: CaptionedImagesConfig, data_dir: str, overwrite: bool) -> dict:
    # The sources are local files; the output (data_dir) may be remote (gs://): epath only.
    builder = CaptionedImages(data_dir=data_dir, config=config)
    dataset_dir = epath.Path(builder.data_dir)
    report_path = dataset_dir / REPORT_FILE
    if dataset_dir.exists():
        if not overwrite:
            if not report_path.exists():
                raise FileExistsError(f"{dataset_dir} exists without {REPORT_FILE}; overwrite?")
            return {**json.loads(report_path.read_text()), "reused": True}
        dataset_dir.rmtree()
        builder = CaptionedImages(data_dir=data_dir, config=config)
    if is_url(data_dir):  # array_record writes local files only: build here, then upload
        with tempfile.TemporaryDirectory(prefix="vd_jax_build_") as tmp:
            local = _build(config, tmp, overwrite=True)
            copy_tree(epath.Path(local["dataset_dir"]), dataset_dir)
        report = {**local, "data_dir": str(data_dir), "dataset_dir": str(dataset_dir)}
        report_path.write_text(json.dumps(report, indent=1))
        return report
    builder.download_and_prepare(file_format="array_record")
    report = {
        "name": config.name,
        "tfds_name": f"{builder.name}/{config.name}",
        "data_dir": str(data_dir),
        "dataset_dir": str(dataset_dir),
        **builder.build_report,
    }
    report_path.write_text(json.dumps(report, indent=1))
    return report


def build_from_folder(
    src_dir: str,
    data_dir: str,
    *,
    name: str | None = None,
    min_size: int = 0,
    val_fraction: float = 0.0,
    num_threads: int = 8,
    overwrite: bool = False,
) -> dict:
    """Builds a TFDS dataset from a folder of captioned images (layout in the module docstring).

    Args:
        src_dir: Folder with the images and their captions.
        data_dir: TFDS data dir; the dataset goes to ``data_dir/captioned_images/<name>/1.0.0``.
        name: Config name (letters, digits, ``_-.``); defaults to the folder's name.
        min_size: Skip images whose shorter side is below this.
        val_fraction: Fraction of keys written to a ``validation`` split (stable by key hash).
        num_threads: Decoding threads for the checking pass.
        overwrite: Rebuild if the dataset exists; otherwise its saved report is returned with
            ``reused=True``.

    Returns:
        The report: ``written``, ``written_per_split``, ``skipped_no_caption``,
        ``skipped_corrupt``, ``skipped_too_small``, ``skipped_duplicate``, ``skipped_keys``
        (reason -> sorted keys), ``errors``, ``tfds_name`` (for the input pipeline's ``name``)
        and ``dataset_dir``. Also saved as ``dataset_dir/build_report.json``.
    """
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(src_dir)
    name = name or os.path.basename(os.path.normpath(src_dir))
    config = CaptionedImagesConfig(
        name=name,
        source_kind="folder",
        sources=(os.path.abspath(src_dir),),
        min_size=min_size,
        val_fraction=val_fraction,
        num_threads=num_threads,
    )
    return _build(config, data_dir, overwrite)


def build_from_webdataset(
    tar_glob: str | Sequence[str],
    data_dir: str,
    *,
    name: str,
    min_size: int = 0,
    val_fraction: float = 0.0,
    num_threads: int = 8,
    overwrite: bool = False,
) -> dict:
    """Builds a TFDS dataset from webdataset / img2dataset ``.tar`` shards.

    Args:
        tar_glob: A glob pattern (e.g. ``"/data/laion/*.tar"``) or an explicit list of shards.
        data_dir: TFDS data dir; the dataset goes to ``data_dir/captioned_images/<name>/1.0.0``.
        name: Config name (letters, digits, ``_-.``).
        min_size: Skip images whose shorter side is below this.
        val_fraction: Fraction of keys written to a ``validation`` split (stable by key hash).
        num_threads: Decoding threads for the checking pass.
        overwrite: Rebuild if the dataset exists.

    Returns:
        The report, as for `build_from_folder`; unreadable shards are listed under ``errors``.
        Shards are read once to check and once per written split to write.
    """
    shards = sorted(glob.glob(tar_glob)) if isinstance(tar_glob, str) else list(tar_glob)
    if not shards:
        raise FileNotFoundError(f"no shards match {tar_glob!r}")
    config = CaptionedImagesConfig(
        name=name,
        source_kind="webdataset",
        sources=tuple(os.path.abspath(s) for s in shards),
        min_size=min_size,
        val_fraction=val_fraction,
        num_threads=num_threads,
    )
    return _build(config, data_dir, overwrite)
