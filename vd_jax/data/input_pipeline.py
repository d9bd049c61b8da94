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

Order and sharding: the run reads one global stream of *slots* 0, 1, 2, ...; slot ``g`` is
record ``perm_e(g mod N)`` of epoch ``e = g // N``, where ``perm_e`` is a pseudo-random
permutation of the N records drawn from ``(seed, e)`` and evaluated per index (grain's
``index_shuffle``), so no host materialises a permutation of the whole dataset. A global
batch of B examples is the next B slots; host ``i`` of P takes the ``i``-th contiguous block
of B / P of them. The global batches therefore do not depend on the number of hosts, and the
iterator's state is one number, the next global slot: `get_state` is the same on every host,
and a run resumes from it on any number of hosts (any global batch size too). Crops and flips
depend only on ``(seed, epoch, record index)``, never on thread timing or the host layout.

Records that fail to read or decode, or are below ``min_size``, are counted
(`InputIterator.stats`), never raised. While training (``num_epochs=None``) such a slot takes
a substitute record drawn deterministically from ``(seed, epoch, slot)``, so every batch is
full and the stream stays the same on any host count. A finite pass (``num_epochs`` set:
evaluation, caching) drops them instead, visiting every good record exactly once, so its
batches may be short; the last global batch, if incomplete, is dropped with
``drop_remainder``.
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
# Substitute draws per slot before a run gives up on its dataset (a record that fails with
# probability 1/2, e.g. min_size against half the images, runs out with 2**-64).
_MAX_DRAWS = 64


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
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self._source = source
        self._num_records = len(source)
        if self._num_records == 0:
            raise ValueError("the data source has no records")
        self.batch_size = batch_size  # this host's
        self.global_batch_size = batch_size * process_count
        self.image_size = image_size
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.shuffle, self.num_epochs, self.drop_remainder = shuffle, num_epochs, drop_remainder
        self.min_size, self.random_crop, self.random_flip = min_size, random_crop, random_flip
        self.caption_field = caption_field
        self._end = None if num_epochs is None else num_epochs * self._num_records
        self._prefetch = prefetch or 2 * batch_size
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)
        self._pending: collections.deque = collections.deque()
        self._start = 0  # global slot of the next batch handed out
        self._ahead = 0  # host-local index (from `_start`) of the next slot to submit
        self._stats = collections.Counter()
        self._skipped_keys: list[tuple[str, str]] = []

    @property
    def records_per_epoch(self) -> int:
        """About how many records this host visits per epoch (before skips)."""
        return -(-self._num_records // self.process_count)

    def _slot(self, t: int) -> int:
        """The global slot of this host's `t`-th slot counted from `_start`."""
        batch, j = divmod(t, self.batch_size)
        block = self.process_index * self.batch_size
        return self._start + batch * self.global_batch_size + block + j

    def _record(self, slot: int, draw: int = 0) -> tuple[int, int]:
        """(epoch, record index) of `slot`; `draw > 0` gives its substitutes."""
        epoch, r = divmod(slot, self._num_records)
        if not self.shuffle and draw == 0:
            return epoch, r
        from grain.experimental import index_shuffle  # deferred: only iterators need grain

        key = [self.seed, epoch] + ([draw, slot] if draw else [])
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        return epoch, index_shuffle(r, max_index=self._num_records - 1, seed=seed, rounds=4)

    def _load_slot(self, slot: int) -> tuple[dict | None, list[_Skip]]:
        """The slot's example (a substitute's while training) and the skips on the way."""
        skips = []
        for draw in range(_MAX_DRAWS if self.num_epochs is None else 1):
            epoch, index = self._record(slot, draw)
            result = self._load(epoch, index)
            if not isinstance(result, _Skip):
                return result, skips
            skips.append(result)
        if self.num_epochs is None:
            raise RuntimeError(
                f"slot {slot}: {_MAX_DRAWS} records in a row failed to load (last: "
                f"{skips[-1].reason} {skips[-1].key}); is the dataset damaged or min_size too "
                "large?"
            )
        return None, skips

    def _load(self, epoch: int, index: int) -> dict | _Skip:
        """Reads and decodes one record (runs on a pool thread)."""
        try:
            record = self._source[index]
        except Exception:  # noqa: BLE001 - a damaged record of any kind must not stop training
            return _Skip("unreadable", f"#{index}")
        key = _text(record.get("key", f"#{index}"))
        image = record.get("image")
        if not isinstance(image, bytes):  # a latent cache: stored arrays and text as they are
            from vd_jax.data import latent_cache  # deferred: it imports TFDS

            return latent_cache.decode_record(record)
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

    def _batch_exists(self, start: int) -> bool:
        """Whether the global batch starting at `start` is handed out at all."""
        if self._end is None:
            return True
        if self.drop_remainder:
            return start + self.global_batch_size <= self._end
        return start < self._end

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch:
            t = self._ahead
            batch_start = self._start + (t // self.batch_size) * self.global_batch_size
            if not self._batch_exists(batch_start):
                return
            slot = self._slot(t)
            self._ahead += 1
            if self._end is not None and slot >= self._end:
                self._pending.append(None)  # past the data: an empty place in the last batch
            else:
                self._pending.append(self._pool.submit(self._load_slot, slot))

    def __iter__(self) -> InputIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while self._batch_exists(self._start):
            examples = [e for e in self._take(self.batch_size) if e is not None]
            self._start += self.global_batch_size
            self._ahead -= self.batch_size
            self._stats["examples"] += len(examples)
            if examples:  # else a finite pass where this host's whole block failed
                return _collate(examples)
        raise StopIteration

    def _take(self, n: int) -> list[dict | None]:
        """The next `n` slots' examples (None where a finite pass has none), counting skips."""
        out = []
        for _ in range(n):
            self._fill()
            future = self._pending.popleft()
            if future is None:
                out.append(None)
                continue
            result, skips = future.result()
            self._stats["records_read"] += len(skips) + (result is not None)
            for skip in skips:
                self._stats[f"skipped_{skip.reason}"] += 1
                if len(self._skipped_keys) < _MAX_LOGGED_KEYS:
                    self._skipped_keys.append((skip.reason, skip.key))
            self._stats["substituted"] += bool(skips) and result is not None
            out.append(result)
        return out

    def get_state(self) -> dict[str, int]:
        """JSON-able position of the next global batch, the same on every host; `set_state`
        resumes exactly there on any number of hosts."""
        return {"position": self._start, "seed": self.seed, "num_records": self._num_records}

    def set_state(self, state: dict[str, int]) -> None:
        """Resumes at a state from `get_state` (same seed and dataset required)."""
        for field, mine in (("seed", self.seed), ("num_records", self._num_records)):
            if field in state and state[field] != mine:
                raise ValueError(f"data state has {field}={state[field]}, this iterator {mine}")
        if "position" not in state:
            raise ValueError(
                f"data state {state} predates global positions (2026-12-03); resume that run "
                "with the vd_jax version that wrote it"
            )
        for future in self._pending:
            if future is not None:
                future.cancel()
        self._pending.clear()
        self._start, self._ahead = int(state["position"]), 0

    def stats(self) -> dict[str, Any]:
        """Counts (records read, examples, skips by reason, substituted slots) and the first
        skipped keys."""
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
