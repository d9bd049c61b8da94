"""TFDS dataset builds (folder, webdataset), the batch iterator and the latent cache."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vd_jax.data import build_from_folder, build_from_webdataset, input_pipeline, write_latent_cache


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _noise(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def _halves() -> np.ndarray:
    """64x32 image: left half red, right half blue (survives a 32px resize untouched)."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32, 0] = 255
    arr[:, 32:, 2] = 255
    return arr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 good images (jpg/png/webp; .txt, .json and captions.csv captions) + 3 bad ones."""
    root = tmp_path_factory.mktemp("src")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    files = {
        "a.jpg": _encode(_noise(rng, 48, 64), "JPEG"),
        "halves.png": _encode(_halves(), "PNG"),
        "c.webp": _encode(_noise(rng, 50, 50), "WEBP"),
        "gray.jpg": _encode(_noise(rng, 35, 70, 1), "JPEG"),
        "rgba.png": _encode(_noise(rng, 64, 96, 4), "PNG"),
        "sub/d.jpg": _encode(_noise(rng, 64, 48), "JPEG"),
        "corrupt.jpg": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "nocap.png": _encode(_noise(rng, 40, 40), "PNG"),
        "tiny.jpg": _encode(_noise(rng, 16, 16), "JPEG"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    for stem in ("a", "gray", "corrupt", "tiny"):
        (root / f"{stem}.txt").write_text(f"caption of {stem}\n")
    (root / "halves.json").write_text(json.dumps({"caption": "red left, blue right"}))
    (root / "rgba.json").write_text(json.dumps({"text": "caption of rgba"}))
    (root / "captions.csv").write_text(
        'file_name,caption\nc.webp,caption of c\nsub/d.jpg,"caption of d, in sub"\n'
    )
    captions = {
        "a.jpg": "caption of a",
        "halves.png": "red left, blue right",
        "c.webp": "caption of c",
        "gray.jpg": "caption of gray",
        "rgba.png": "caption of rgba",
        "sub/d.jpg": "caption of d, in sub",
    }
    return root, files, captions


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    root, _, _ = folder
    data_dir = tmp_path_factory.mktemp("tfds")
    report = build_from_folder(str(root), str(data_dir), name="toy", min_size=32)
    return data_dir, report


def _read_all(data_dir, name, split="train"):
    source = input_pipeline.open_data_source(str(data_dir), name, split)
    return {r["key"].decode(): r for r in (source[i] for i in range(len(source)))}


def test_folder_build_report_and_bytes(folder, built):
    _, files, captions = folder
    data_dir, report = built
    assert report["written"] == 6 and report["written_per_split"] == {"train": 6}
    assert (report["skipped_corrupt"], report["skipped_no_caption"]) == (1, 1)
    assert (report["skipped_too_small"], report["skipped_duplicate"]) == (1, 0)
    assert report["skipped_keys"]["corrupt"] == ["corrupt.jpg"]
    assert report["skipped_keys"]["no_caption"] == ["nocap.png"]
    assert report["skipped_keys"]["too_small"] == ["tiny.jpg"]
    saved = json.loads(open(os.path.join(report["dataset_dir"], "build_report.json")).read())
    assert saved["skipped_keys"] == report["skipped_keys"]
    records = _read_all(data_dir, report["tfds_name"])
    assert sorted(records) == sorted(captions)
    for key, record in records.items():
        assert record["image"] == files[key]  # byte-identical, not re-encoded
        assert record["caption"].decode() == captions[key]
    assert (records["rgba.png"]["width"], records["rgba.png"]["height"]) == (96, 64)
    assert "tensorflow" not in sys.modules
    again = build_from_folder(str(folder[0]), str(data_dir), name="toy", min_size=32)
    assert again["reused"] and again["written"] == 6


def test_validation_split_is_a_stable_partition(folder, tmp_path):
    report = build_from_folder(str(folder[0]), str(tmp_path), name="val", val_fraction=0.5)
    splits = {s: _read_all(tmp_path, report["tfds_name"], s) for s in report["written_per_split"]}
    assert set(splits) == {"train", "validation"}  # holds for these keys' hashes
    assert not set(splits["train"]) & set(splits["validation"])
    assert sum(map(len, splits.values())) == report["written"] == 7  # tiny.jpg kept: no min_size


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_build(tmp_path):
    rng = np.random.default_rng(1)
    jpg = {k: _encode(_noise(rng, 40 + k, 60, 3), "JPEG") for k in range(6)}
    meta = json.dumps({"caption": "from json", "original_width": 600, "original_height": 400})
    _write_tar(
        tmp_path / "00000.tar",
        [
            ("00000000.jpg", jpg[0]),
            ("00000000.txt", b"first"),
            ("00000001.jpg", jpg[1]),
            ("00000001.json", meta.encode()),
            ("00000002.jpg", b"\xff\xd8 not really a jpeg"),
            ("00000002.txt", b"corrupt one"),
        ],
    )
    _write_tar(
        tmp_path / "00001.tar",
        [
            ("00010000.jpg", jpg[3]),  # no caption anywhere
            ("00010001.jpg", _encode(_noise(rng, 10, 20), "JPEG")),
            ("00010001.txt", b"too small"),
            ("00010002.jpg", jpg[5]),
            ("00010002.txt", b"last"),
            ("00010002.json", b'{"width": 60}'),
        ],
    )
    big = _encode(_noise(rng, 200, 200), "PNG")
    _write_tar(
        tmp_path / "00002.tar",
        [
            ("00020000.jpg", jpg[2]),
            ("00020000.txt", b"kept"),
            ("00020001.png", big),
            ("00020001.txt", b"lost"),
        ],
    )
    with open(tmp_path / "00002.tar", "r+b") as f:  # cut inside the second sample's image
        f.truncate(3 * 512 + len(jpg[2]) + len(big) // 2)
    report = build_from_webdataset(
        str(tmp_path / "*.tar"), str(tmp_path / "tfds"), name="wds", min_size=24
    )
    assert report["written"] == 4
    assert len(report["errors"]) == 1 and "00002.tar" in report["errors"][0]
    assert report["skipped_keys"] == {
        "no_caption": ["00010000"],
        "corrupt": ["00000002"],
        "too_small": ["00010001"],
        "duplicate": [],
    }
    records = _read_all(tmp_path / "tfds", report["tfds_name"])
    expected = {
        "00000000": (jpg[0], "first"),
        "00000001": (jpg[1], "from json"),
        "00010002": (jpg[5], "last"),
        "00020000": (jpg[2], "kept"),
    }
    assert sorted(records) == sorted(expected)
    for key, (data, caption) in expected.items():
        assert records[key]["image"] == data and records[key]["caption"].decode() == caption
    assert records["00000001"]["original_width"] == 600
    assert records["00000000"]["original_width"] == 60


def _config(data_dir, report, **overrides):
    fields = {"source": "tfds", "name": report["tfds_name"], "data_dir": str(data_dir)}
    return ml_collections.ConfigDict({**fields, **overrides})


def _iterator(built, batch_size=2, seed=0, **kwargs):
    data_dir, report = built
    config = _config(data_dir, report, **kwargs.pop("config", {}))
    return input_pipeline.create_iterator(
        config, batch_size_per_host=batch_size, seed=seed, image_size=32, **kwargs
    )


def _keys(it, n):
    return [list(next(it)["key"]) for _ in range(n)]


def test_batches_shapes_and_values(built):
    it = _iterator(built, batch_size=3, config={"random_crop": False, "shuffle": False})
    batches = [next(it), next(it)]
    for batch in batches:
        assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["caption"].dtype == object and isinstance(batch["caption"][0], str)
    found = {k: img for b in batches for k, img in zip(b["key"], b["image"], strict=True)}
    halves = found["halves.png"]  # 64x32 center-cropped to columns 16..47
    np.testing.assert_allclose(halves[:, :16], [[[1, 0, 0]] * 16] * 32)
    np.testing.assert_allclose(halves[:, 16:], [[[0, 0, 1]] * 16] * 32)
    it.close()


def test_order_deterministic_and_per_epoch(built):
    first, second = _iterator(built, seed=3), _iterator(built, seed=3)
    a, b = _keys(first, 6), _keys(second, 6)
    assert a == b
    epoch0, epoch1 = sum(a[:3], []), sum(a[3:], [])
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 6
    assert epoch0 != epoch1
    assert _keys(_iterator(built, seed=4), 3) != a[:3]
    crops = [next(_iterator(built, seed=3))["image"] for _ in range(2)]
    np.testing.assert_array_equal(crops[0], crops[1])


def test_two_hosts_disjoint_and_covering(built):
    seen = []
    for host in range(2):
        it = _iterator(
            built, batch_size=1, process_index=host, process_count=2, config={"num_epochs": 1}
        )
        seen.append([k for batch in it for k in batch["key"]])
    assert len(seen[0]) == len(seen[1]) == 3
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 6


def test_state_resumption(built):
    it = _iterator(built, seed=7, config={"random_crop": True, "random_flip": True})
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]  # crosses into the next epoch
    resumed = _iterator(built, seed=7, config={"random_crop": True, "random_flip": True})
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert list(got["key"]) == list(want["key"])
        np.testing.assert_array_equal(got["image"], want["image"])
    assert resumed.get_state() == it.get_state()
    with pytest.raises(ValueError):
        _iterator(built, seed=8).set_state(state)


def _global_batches(built, hosts, n, state=None, **kwargs):
    """n global batches' keys (host batches concatenated in host order) with `hosts` hosts."""
    its = [
        _iterator(built, batch_size=4 // hosts, process_index=i, process_count=hosts, **kwargs)
        for i in range(hosts)
    ]
    for it in its:
        if state is not None:
            it.set_state(state)
    out = [sum((list(next(it)["key"]) for it in its), []) for _ in range(n)]
    states = [it.get_state() for it in its]
    assert all(s == states[0] for s in states)  # one global position, whatever the host
    return out, states[0]


def test_any_host_count_sees_the_same_batches_and_resumes(built):
    one, state1 = _global_batches(built, 1, 5, seed=5)
    two, state2 = _global_batches(built, 2, 5, seed=5)
    four, _ = _global_batches(built, 4, 5, seed=5)
    assert one == two == four and state1 == state2 == {**state1, "position": 20}
    # 2 hosts stop after 2 batches; 1 host (and 4) take over from their state.
    _, mid = _global_batches(built, 2, 2, seed=5)
    assert _global_batches(built, 1, 3, state=mid, seed=5)[0] == one[2:]
    assert _global_batches(built, 4, 3, state=mid, seed=5)[0] == one[2:]


class _Huge:
    """A billion records made on demand: an iterator that listed them all would need GBs."""

    def __len__(self):
        return 10**9

    def __getitem__(self, index):
        return {"image_latent": np.full((2,), index, np.int64), "key": f"{index}".encode()}


def test_no_whole_dataset_permutation():
    it = input_pipeline.InputIterator(_Huge(), batch_size=8, image_size=8, seed=1, num_threads=2)
    first = [next(it)["image_latent"][:, 0] for _ in range(3)]
    keys = np.concatenate(first)
    assert len(set(keys.tolist())) == 24 and keys.max() > 10**6  # shuffled over all 1e9
    it.close()


class _Damaged:
    """A data source whose record 1 has garbage image bytes and record 2 cannot be read."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if index == 2:
            raise OSError("bad block")
        record = dict(self.source[index])
        if index == 1:
            record["image"] = b"\x89PNG garbage"
        return record


def test_corrupt_records_skipped_and_counted(built):
    data_dir, report = built
    source = _Damaged(input_pipeline.open_data_source(str(data_dir), report["tfds_name"], "train"))
    it = _iterator(
        built,
        batch_size=2,
        drop_remainder=False,
        data_source=source,
        config={"num_epochs": 1, "min_size": 48},
    )
    keys = [k for batch in it for k in batch["key"]]
    stats = it.stats()
    # Read-time min_size=48 drops halves.png (64x32) and gray.jpg (70x35) unless damaged first.
    small = [
        i for i in (0, 3, 4, 5) if min(source.source[i]["width"], source.source[i]["height"]) < 48
    ]
    assert stats["skipped_corrupt"] == 1 and stats["skipped_unreadable"] == 1
    assert stats["skipped_too_small"] == len(small)
    assert stats["records_read"] == 6
    assert stats["examples"] == len(keys) == 4 - len(small)
    assert ("unreadable", "#2") in stats["skipped_keys"]
    assert source.source[1]["key"].decode() not in keys


def test_training_stream_substitutes_bad_records(built):
    data_dir, report = built
    source = _Damaged(input_pipeline.open_data_source(str(data_dir), report["tfds_name"], "train"))
    it = _iterator(built, batch_size=3, data_source=source, seed=2)
    batches = [next(it) for _ in range(4)]  # two epochs of 6 slots
    assert all(len(b["key"]) == 3 for b in batches)  # every batch full
    keys = [k for b in batches for k in b["key"]]
    bad = source.source[1]["key"].decode()
    assert bad not in keys
    stats = it.stats()
    assert stats["skipped_unreadable"] >= 2 and stats["skipped_corrupt"] >= 2
    assert stats["substituted"] == 4 and stats["examples"] == 12
    again = _iterator(built, batch_size=3, data_source=source, seed=2)
    assert [k for _ in range(4) for k in next(again)["key"]] == keys  # deterministic


def _encode_fn(batch):
    images = batch["image"]
    pooled = images.reshape(len(images), 4, 8, 4, 8, 3).mean(axis=(2, 4))
    seeds = [sum(map(ord, c)) for c in batch["caption"]]
    context = np.stack([np.random.default_rng(s).normal(size=(3, 5)) for s in seeds])
    return {
        "image_latent": pooled.astype(np.float32),
        "text_context": context.astype(np.float16),
        "text_ids": np.array([[len(c)] * 7 for c in batch["caption"]], np.int32),
    }


def test_latent_cache_roundtrip(built, tmp_path):
    data_dir, _ = built
    one_pass = {"num_epochs": 1, "shuffle": False, "random_crop": False}
    it = _iterator(built, batch_size=4, drop_remainder=False, config=one_pass)
    expected = {}
    for batch in _iterator(built, batch_size=4, drop_remainder=False, config=one_pass):
        out = _encode_fn(batch)
        for i, key in enumerate(batch["key"]):
            expected[key] = {k: v[i] for k, v in out.items()}
    info = write_latent_cache(it, _encode_fn, str(tmp_path), name="toy_latents")
    assert info["num_examples"] == {"train": 6}
    records = _read_all(tmp_path, info["tfds_name"])
    assert sorted(records) == sorted(expected)
    for key, want in expected.items():
        for name, value in want.items():
            assert records[key][name].dtype == value.dtype
            np.testing.assert_array_equal(records[key][name], value)
    cache_it = input_pipeline.create_iterator(
        _config(tmp_path, info), batch_size_per_host=3, seed=0, image_size=32
    )
    batch = next(cache_it)
    assert batch["image_latent"].shape == (3, 4, 4, 3) and batch["text_context"].shape == (3, 3, 5)
    assert batch["text_context"].dtype == np.float16 and batch["caption"].dtype == object
    for i, key in enumerate(batch["key"]):
        np.testing.assert_array_equal(batch["text_ids"][i], expected[key]["text_ids"])
