"""Training input pipeline: host-local numpy batches from TFDS array_record datasets.

Reads datasets written by `vd_jax.datasets` (captioned images or latent caches) by random access
(``tfds.builder_from_directory(...).as_data_source(split)``; TensorFlow is not needed).

``data_config`` (an ``ml_collections.ConfigDict``; missing fields take the defaults of
`default_data_config`):

  source: ``"tfds"``, the only source read here (the trainer handles ``"fake"`` itself).
  name: Dataset path under ``data_dir``, as in a build report's ``tfds_name``, e.g.
    ``"captioned_images/laion_aesthetic"`` or ``"latent_cache/laion_aesthetic_256"``; a version
    folder may be appended, else the newest is used.
  data_dir: The TFDS data dir given to the build functions.
  split: TFDS split, slicing allowed (``"train"``, ``"validation"``, ``"train[:1%]"``).
  shuffle: Visit records in a fresh permutation each epoch (else in stored order).
  num_epochs: Epochs to run; ``None`` repeats forever (usual for training).
  min_size: Skip records whose stored shorter side is below this, without decoding (0 = off).
  random_crop: Random crop after the resize (training); ``False`` center-crops (evaluation).
  random_flip: Also flip horizontally with probability 1/2.
  caption_field: Record field returned as ``caption``.
  num_threads: Threads that read and decode records.
  prefetch: Records read and decoded ahead; ``0`` means twice the batch size.

Batches from captioned images: ``image`` float32 [B, S, S, 3] in [0, 1] (shorter side resized
to S = ``image_size`` with bicubic filtering, then cropped), ``caption`` and ``key`` object
arrays of str. From a latent cache: every stored field, arrays stacked to [B, ...], text fields
as object arrays of str.

Order and sharding: epoch ``e`` visits a permutation of all N records drawn from
``(seed, e)``, the same on every host. It is cut to a multiple of ``process_count`` and host
``i`` takes positions ``i, i + P, i + 2P, ...``: hosts are disjoint, together cover the epoch,
and each gets ``N // P`` records. Batches run on across epoch boundaries; with a finite
``num_epochs`` the last short batch is dropped if ``drop_remainder``. Crops and flips depend only
on ``(seed, epoch, record index)``, never on thread timing, so the stream is deterministic.
``get_state()`` / ``set_state()`` save and restore ``(epoch, position)`` for exact resumption.

Records that fail to read or decode are skipped and counted (`InputIterator.stats`), never
raised. Skips make hosts' epochs uneven; run a fixed number of steps with ``num_epochs=None``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from vd_jax.data.fake_data import FakeIterator

_MAX_LOGGED_KEYS = 100


_DEFAULTS = {
    "source": "tfds",
    "name": "",
    "data_dir": "",
    "split": "train",
    "shuffle": True,
    "num_epochs": None,
    "min_size": 0,
    "random_crop": True,
    "random_flip": False,
    "caption_field": "caption",
    "num_threads": 8,
    "prefetch": 0,
}


def default_data_config() -> ml_collections.ConfigDict:
    """Returns a data config with every field this module reads, at its default."""
    cfg = ml_collections.ConfigDict(dict(_DEFAULTS))
    # A typed reference, so that configs may set an int here where the default is None.
    cfg.num_epochs = ml_collections.FieldReference(None, field_type=int)
    return cfg


def resolve_dataset_dir(data_dir: str, name: str) -> epath.Path:
    """Returns the folder holding ``dataset_info.json`` for ``name`` (newest version if none)."""
    path = epath.Path(data_dir) / name
    if (path / "dataset_info.json").exists():
        return path
    versions = []
    if path.is_dir():
        for child in path.iterdir():
            parts = child.name.split(".")
            if (child / "dataset_info.json").exists() and all(p.isdigit() for p in parts):
                versions.append((tuple(int(p) for p in parts), child))
    if not versions:
        raise FileNotFoundError(f"no TFDS dataset at {path}")
    return max(versions)[1]


def open_data_source(data_dir: str, name: str, split: str) -> Sequence[dict]:
    """Opens a random-access source of decoded feature dicts for one split."""
    import tensorflow_datasets as tfds  # deferred: the 'fake' source path should not pay for it

    builder = tfds.builder_from_directory(resolve_dataset_dir(data_dir, name))
    return builder.as_data_source(split)


def decode_image(data: bytes, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Decodes image bytes to float32 [size, size, 3] in [0, 1].

    The shorter side is resized to ``size`` (bicubic), then a ``size`` square is cropped: at a
    position drawn from ``rng``, or centered when ``rng`` is None.
    """
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")  # grayscale, palette, CMYK and alpha images all become RGB
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    if rng is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = int(rng.integers(new_w - size + 1)), int(rng.integers(new_h - size + 1))
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0


class _Skip:
    """A record the iterator drops, with why."""

    def __init__(self, reason: str, key: str):
        self.reason, self.key = reason, key


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class InputIterator:
    """Iterator of host-local numpy batch dicts; see the module docstring for order and state."""

    def __init__(
        self,
        source: Sequence[dict],
        *,
        batch_size: int,
        image_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        min_size: int = 0,
        random_crop: bool = True,
        random_flip: bool = False,
        caption_field: str = "caption",
        num_threads: int = 8,
        prefetch: int = 0,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self._source = source
        self._num_records = len(source)
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.shuffle, self.num_epochs, self.drop_remainder = shuffle, num_epochs, drop_remainder
        self.min_size, self.random_crop, self.random_flip = min_size, random_crop, random_flip
        self.caption_field = caption_field
        self._prefetch = prefetch or 2 * batch_size
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)
        self._orders: dict[int, np.ndarray] = {}
        self._pending: collections.deque = collections.deque()
        self._epoch, self._position = 0, 0  # next record to hand out
        self._ahead = (0, 0)  # next record to submit for reading
        self._stats = collections.Counter()
        self._skipped_keys: list[tuple[str, str]] = []
        if self.records_per_epoch == 0:
            raise ValueError(f"{self._num_records} records cannot feed {process_count} hosts")

    @property
    def records_per_epoch(self) -> int:
        """Records this host visits per epoch (before skips)."""
        return self._num_records // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch on this host, ignoring skipped records."""
        return self.records_per_epoch // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        """This host's record indices for ``epoch`` (the last two epochs are cached)."""
        if epoch not in self._orders:
            # int32 halves the memory of the whole-epoch permutation below 2**31 records.
            dtype = np.int32 if self._num_records < 2**31 else np.int64
            order = np.arange(self._num_records, dtype=dtype)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            used = self.records_per_epoch * self.process_count
            self._orders[epoch] = order[:used][self.process_index :: self.process_count].copy()
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
        return self._orders[epoch]

    def _load(self, epoch: int, index: int) -> dict | _Skip:
        """Reads and decodes one record (runs on a pool thread)."""
        try:
            record = self._source[index]
        except Exception:  # noqa: BLE001 - a damaged record of any kind must not stop training
            return _Skip("unreadable", f"#{index}")
        key = _text(record.get("key", f"#{index}"))
        image = record.get("image")
        if not isinstance(image, bytes):  # a latent cache: stored arrays and text as they are
            return {
                k: _text(v) if isinstance(v, bytes) else np.asarray(v) for k, v in record.items()
            }
        if self.min_size and min(record["width"], record["height"]) < self.min_size:
            return _Skip("too_small", key)
        # Seeded per record so the result does not depend on which thread runs first.
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            pixels = decode_image(image, self.image_size, rng if self.random_crop else None)
        except Exception:  # noqa: BLE001 - Pillow raises many types for bad bytes
            return _Skip("corrupt", key)
        if self.random_flip and rng.random() < 0.5:
            pixels = np.ascontiguousarray(pixels[:, ::-1])
        caption = _text(record.get(self.caption_field, ""))
        return {"image": pixels, "caption": caption, "key": key}

    def _advance(self, epoch: int, position: int) -> tuple[int, int] | None:
        position += 1
        if position >= self.records_per_epoch:
            epoch, position = epoch + 1, 0
        if self.num_epochs is not None and epoch >= self.num_epochs:
            return None
        return epoch, position

    def _fill(self) -> None:
        while self._ahead is not None and len(self._pending) < self._prefetch:
            epoch, position = self._ahead
            index = int(self._order(epoch)[position])
            self._pending.append((epoch, position, self._pool.submit(self._load, epoch, index)))
            self._ahead = self._advance(epoch, position)

    def __iter__(self) -> InputIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self.batch_size:
            self._fill()
            if not self._pending:
                break
            epoch, position, future = self._pending.popleft()
            result = future.result()
            nxt = self._advance(epoch, position)
            self._epoch, self._position = nxt if nxt is not None else (epoch + 1, 0)
            self._stats["records_read"] += 1
            if isinstance(result, _Skip):
                self._stats[f"skipped_{result.reason}"] += 1
                if len(self._skipped_keys) < _MAX_LOGGED_KEYS:
                    self._skipped_keys.append((result.reason, result.key))
                continue
            examples.append(result)
        if not examples or (self.drop_remainder and len(examples) < self.batch_size):
            raise StopIteration
        self._stats["examples"] += len(examples)
        return _collate(examples)

    def get_state(self) -> dict[str, int]:
        """JSON-able position of the next record; `set_state` resumes exactly there."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
        }

    def set_state(self, state: dict[str, int]) -> None:
        """Resumes at a state from `get_state` (same seed and host layout required)."""
        for field in ("seed", "process_index", "process_count"):
            if field in state and state[field] != getattr(self, field):
                raise ValueError(
                    f"state has {field}={state[field]}, iterator {getattr(self, field)}"
                )
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        done = self.num_epochs is not None and self._epoch >= self.num_epochs
        self._ahead = None if done else (self._epoch, self._position)

    def stats(self) -> dict[str, Any]:
        """Counts (records read, examples, skips by reason) and the first skipped keys."""
        return {**self._stats, "skipped_keys": list(self._skipped_keys)}

    def close(self) -> None:
        """Stops the reader threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> InputIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collate(examples: list[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for name in examples[0]:
        values = [e[name] for e in examples]
        if isinstance(values[0], str):
            batch[name] = np.array(values, dtype=object)
        else:
            batch[name] = np.stack(values)
    return batch


def create_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    batch_size_per_host: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    image_size: int = 256,
    drop_remainder: bool = True,
    data_source: Sequence[dict] | None = None,
) -> InputIterator:
    """Creates this host's batch iterator over a TFDS dataset (see the module docstring).

    Args:
        data_config: Dataset fields (module docstring); ``source`` must be ``"tfds"``.
        batch_size_per_host: Examples per batch on this host.
        process_index: This host (``jax.process_index()``).
        process_count: Number of hosts (``jax.process_count()``).
        seed: Non-negative seed of the record order, crops and flips.
        image_size: Side of the square output images (captioned-image datasets).
        drop_remainder: Drop the last short batch when ``num_epochs`` ends the stream.
        data_source: Read this random-access sequence of feature dicts instead of opening
            ``data_config.name`` (tests, custom sources).

    Returns:
        An `InputIterator` with ``get_state`` / ``set_state`` / ``stats`` / ``close``.
    """
    cfg = ml_collections.ConfigDict({k: data_config.get(k, v) for k, v in _DEFAULTS.items()})
    if cfg.source != "tfds":
        raise ValueError(f"source {cfg.source!r} is not read here (the trainer handles 'fake')")
    if data_source is None:
        data_source = open_data_source(cfg.data_dir, cfg.name, cfg.split)
    return InputIterator(
        data_source,
        batch_size=batch_size_per_host,
        image_size=image_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        shuffle=cfg.shuffle,
        num_epochs=cfg.num_epochs,
        drop_remainder=drop_remainder,
        min_size=cfg.min_size,
        random_crop=cfg.random_crop,
        random_flip=cfg.random_flip,
        caption_field=cfg.caption_field,
        num_threads=cfg.num_threads,
        prefetch=cfg.prefetch,
    )


def make_iterator(config, *, process_index: int, process_count: int):
    """This host's batch iterator: fake data, or the TFDS input pipeline."""
    per_host = config.batch_size // process_count
    if config.data.source == "fake":
        e = config.encoders
        return FakeIterator(
            global_batch_size=config.batch_size,
            kind=config.data.get("kind", "latents"),
            num_examples=config.data.get("num_examples", 64),
            latent_size=config.latent_size,
            image_size=config.image_size,
            text_dim=config.model.text_dim,
            context_dim=config.model.context_dim,
            text_context_len=e.text_context_len,
            image_context_len=e.image_context_len,
            seed=config.seed,
            process_index=process_index,
            process_count=process_count,
        )
    return create_iterator(
        config.data,
        batch_size_per_host=per_host,
        process_index=process_index,
        process_count=process_count,
        seed=config.seed,
        image_size=config.image_size,
    )
