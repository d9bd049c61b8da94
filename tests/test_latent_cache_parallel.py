"""A latent cache built by several processes: shards, done-markers, finalize, bfloat16 contexts."""

from __future__ import annotations

import io
from pathlib import Path

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import tiny
from vd_jax.data import caching, captioned_images, input_pipeline, latent_cache
from vd_jax.data.cli import main

FLOWS = "text_to_image+image_to_text"  # together they need all four cached arrays
# Full-size VD: 256^2 images -> 4x32x32 latents, Optimus 768, CLIP 77x768 text / 257x768 image.
VD_ARRAYS = {
    "image_latent": (4, 32, 32),
    "text_latent": (768,),
    "text_context": (77, 768),
    "image_context": (257, 768),
}


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """7 captioned 16x16 PNGs as a captioned-images dataset with train and validation splits."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(7):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        (root / f"img{i}.png").write_bytes(buf.getvalue())
        (root / f"img{i}.txt").write_text(f"picture {i}")
    data_dir = tmp_path_factory.mktemp("tfds")
    report = captioned_images.build_from_folder(str(root), str(data_dir), val_fraction=0.4)
    assert all(report["written_per_split"].get(s) for s in ("train", "validation")), report
    return str(data_dir), report["tfds_name"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """One `CacheEncoder` for every build of this module (as each process would build it: the
    same seed gives the same encoders); their random init dominates the time on CPU."""
    d = str(tmp_path_factory.getbasetemp() / "jit_cache")  # shared with other test modules
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    made, make = {}, caching.CacheEncoder

    def cached(config, *, batch_size):
        if batch_size not in made:
            made[batch_size] = make(config, batch_size=batch_size)
        return made[batch_size]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caching, "CacheEncoder", cached)
        yield made


def _build(source, cache_dir, **kw):
    data_dir, name = source
    config = tiny.get_config(f"kind=raw,flows={FLOWS}")
    config.image_size = 16
    return caching.build_latent_cache(
        config, data_dir=str(cache_dir), source_name=name, source_data_dir=data_dir,
        name="toy", batch_size=2, **kw,
    )  # fmt: skip


def _read(info) -> dict[str, dict[str, dict]]:
    """{split: {key: example}} through the training pipeline's reader; keys must be unique."""
    out = {}
    for split in info["num_examples"]:
        source = input_pipeline.open_data_source(info["data_dir"], info["tfds_name"], split)
        records = [latent_cache.decode_record(r) for r in source]
        out[split] = {r["key"]: r for r in records}
        assert len(out[split]) == len(records) == info["num_examples"][split]
    return out


@pytest.fixture(scope="module")
def single(source, encoders, tmp_path_factory):
    """The one-process cache, contexts kept in float32."""
    return _build(source, tmp_path_factory.mktemp("single"), context_dtype="float32")


@pytest.fixture(scope="module")
def sharded(source, encoders, tmp_path_factory):
    """Two shards run one after the other, the second shard first; bfloat16 contexts and two
    files per shard. Returns the reports and what the folder held in between."""
    cache_dir = tmp_path_factory.mktemp("sharded")
    kw = dict(num_shards=2, examples_per_file=1)
    first = _build(source, cache_dir, shard_index=1, **kw)
    dataset_dir = latent_cache.dataset_dir(cache_dir, "toy")
    between = {"report": first, "dataset_info": (dataset_dir / "dataset_info.json").exists()}
    with pytest.raises(latent_cache.IncompleteCacheError) as error:
        caching.finalize_latent_cache(str(cache_dir), "toy", num_shards=2)
    between["error"] = str(error.value)
    # A rerun of the finished shard encodes nothing; one with other settings is refused.
    local = Path(dataset_dir)
    written = {p.name: p.stat().st_mtime_ns for p in local.iterdir() if p.is_file()}
    between["rerun"] = _build(source, cache_dir, shard_index=1, **kw)
    between["rewritten"] = [
        p.name for p in local.iterdir() if p.is_file() and written[p.name] != p.stat().st_mtime_ns
    ]
    with pytest.raises(ValueError, match="built with other settings"):
        _build(source, cache_dir, shard_index=1, context_dtype="float32", **kw)
    return between, _build(source, cache_dir, shard_index=0, **kw)


def test_two_shards_make_the_single_process_cache(single, sharded):
    between, info = sharded
    # After shard 1 alone: no dataset, a clear report and error naming shard 0.
    assert between["report"]["complete"] is False and between["report"]["waiting_for"] == [0]
    assert not between["dataset_info"] and "shards [0] of 2" in between["error"]
    assert between["rerun"]["waiting_for"] == [0] and between["rewritten"] == []
    assert info["complete"] and info["num_examples"] == single["num_examples"]
    overrides = {**single["train_overrides"], "data.data_dir": info["data_dir"]}
    assert info["train_overrides"] == overrides
    assert info["skipped"] == single["skipped"] == {}
    # examples_per_file=1 over 2 shards: 2 files per shard per split, each from a record range.
    assert info["files"] == {s: 2 * -(-n // 2) for s, n in info["num_examples"].items()}
    builder = tfds.builder_from_directory(info["dataset_dir"])
    for split, n in info["num_examples"].items():
        assert builder.info.splits[split].num_examples == n
        assert len(builder.info.splits[split].shard_lengths) == info["files"][split]
    want, got = _read(single), _read(info)
    for split in want:
        assert sorted(got[split]) == sorted(want[split])
        for key, example in want[split].items():
            assert got[split][key]["caption"] == example["caption"]
            for name in ("image_latent", "text_latent"):
                assert got[split][key][name].dtype == np.float32
                np.testing.assert_array_equal(got[split][key][name], example[name])
            for name in ("image_context", "text_context"):
                assert got[split][key][name].dtype == ml_dtypes.bfloat16
                np.testing.assert_array_equal(
                    _bits(got[split][key][name]), _bits(example[name].astype(ml_dtypes.bfloat16))
                )


def test_rerun_and_finalize_reuse(source, sharded):
    _, info = sharded
    again = _build(source, info["data_dir"], num_shards=2, shard_index=1, examples_per_file=1)
    assert again["reused"] is True
    argv = ["prog", "cache", "--finalize", f"--data_dir={info['data_dir']}", "--name=toy",
            "--num_shards=2"]  # fmt: skip
    report = main(argv)
    assert report["num_examples"] == info["num_examples"] and "train_flags" in report


def test_overwrite_with_another_layout(source, encoders, tmp_path):
    for shard in (0, 1):
        _build(source, tmp_path, num_shards=2, shard_index=shard, examples_per_file=1)
    dataset_dir = latent_cache.dataset_dir(tmp_path, "toy")
    old = {p.name for p in latent_cache.data_files(dataset_dir)}
    kw = dict(num_shards=2, examples_per_file=4, overwrite=True)
    half = _build(source, tmp_path, shard_index=1, **kw)
    # Shard 1 forgot the finished cache and the old layout's files; shard 0, done with other
    # settings, counts as not done until it is rebuilt as well.
    assert half["complete"] is False and half["waiting_for"] == [0]
    assert not (dataset_dir / "dataset_info.json").exists()
    info = _build(source, tmp_path, shard_index=0, **kw)
    assert info["complete"] and info["files"] == {"train": 2, "validation": 2}
    new = {p.name for p in latent_cache.data_files(dataset_dir)}
    assert len(new) == 4 and not new & old
    assert sum(info["num_examples"].values()) == 7


def test_contexts_are_the_encoder_outputs_in_bfloat16(source, encoders, sharded):
    """What training reads is the encoder's float32 output rounded to bfloat16, bit for bit."""
    _, info = sharded
    data_dir, name = source
    one_pass = dict(shuffle=False, num_epochs=1, random_crop=False)
    config = ml_collections.ConfigDict(
        dict(source="tfds", name=name, data_dir=data_dir, **one_pass)
    )
    with input_pipeline.create_iterator(
        config, batch_size_per_host=2, image_size=16, drop_remainder=False
    ) as it:
        batch = next(it)
    out = encoders[2](batch)
    stored = _read(info)["train"]
    for i, key in enumerate(batch["key"]):
        for name in ("image_context", "text_context"):
            assert out[name].dtype == np.float32
            want = np.asarray(out[name][i]).astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(_bits(stored[key][name]), _bits(want))


def _batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"key": [f"k{i}"], "caption": ["a cat"], "x": rng.normal(size=(1, 4, 6))}


def _encode(batch):
    return {"context": np.asarray(batch["x"], np.float32)}


def test_missing_shard_is_not_a_dataset(tmp_path):
    dataset_dir = latent_cache.dataset_dir(tmp_path, "part")
    for shard in (0, 2):  # shard 1 of 3 never finishes
        writer = latent_cache.ShardWriter(dataset_dir, shard_index=shard, num_shards=3)
        encoded = latent_cache.encode_batches(_batches(2, seed=shard), _encode)
        writer.write_file("train", shard, 3, encoded)
        writer.commit()
    with pytest.raises(latent_cache.IncompleteCacheError, match=r"shards \[1\] of 3"):
        latent_cache.finalize(tmp_path, "part", 3)
    argv = ["prog", "cache", "--finalize", f"--data_dir={tmp_path}", "--name=part",
            "--num_shards=3"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"shards \[1\] of 3 have not finished"):
        main(argv)
    assert not (dataset_dir / "dataset_info.json").exists()
    assert not (dataset_dir / latent_cache.INFO_FILE).exists()
    with pytest.raises(FileNotFoundError):
        input_pipeline.resolve_dataset_dir(str(tmp_path), "latent_cache/part")
    # Shards that disagree on the layout are refused too.
    writer = latent_cache.ShardWriter(dataset_dir, shard_index=1, num_shards=3)
    batches = ({**b, "x": b["x"][..., :5]} for b in _batches(2))
    writer.write_file("train", 1, 3, latent_cache.encode_batches(batches, _encode))
    writer.commit()
    with pytest.raises(ValueError, match="shards disagree on layout"):
        latent_cache.finalize(tmp_path, "part", 3)


def test_bfloat16_round_trip_is_exact(tmp_path):
    outputs = [_encode(b)["context"] for b in _batches(5)]
    info = latent_cache.write_latent_cache(
        _batches(5), _encode, str(tmp_path), name="bf16", array_dtypes={"context": "bfloat16"}
    )
    assert info["arrays"] == {"context": [[4, 6], "bfloat16"]}
    stored = _read(info)["train"]
    for i, out in enumerate(outputs):
        got = stored[f"k{i}"]["context"]
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(
            _bits(got), _bits(np.asarray(out[0]).astype(ml_dtypes.bfloat16))
        )


@pytest.mark.parametrize("context_dtype", ["float32", "bfloat16"])
def test_bytes_per_example_at_full_size(tmp_path, context_dtype):
    """On-disk bytes per example of a full-size VD cache (random normal arrays, 16 examples)."""
    rng = np.random.default_rng(0)
    batches = (
        {"key": [f"{i:08d}.jpg"], "caption": ["a photo of a cat sitting on a mat"]}
        for i in range(16)
    )

    def encode(batch):
        return {k: rng.normal(size=(1, *s)).astype(np.float32) for k, s in VD_ARRAYS.items()}

    dtypes = {"image_context": context_dtype, "text_context": context_dtype}
    info = latent_cache.write_latent_cache(
        batches, encode, str(tmp_path), name="vd", array_dtypes=dtypes
    )
    itemsize = {k: 2 if k in dtypes and context_dtype == "bfloat16" else 4 for k in VD_ARRAYS}
    analytic = sum(np.prod(s) * itemsize[k] for k, s in VD_ARRAYS.items())
    measured = info["num_bytes"]["train"] / info["num_examples"]["train"]
    print(f"{context_dtype}: {analytic} B/example analytic, {measured:.0f} measured on disk")
    assert analytic == {"float32": 1_045_504, "bfloat16": 532_480}[context_dtype]
    # array_record compresses a little and pads files to 64 KiB blocks.
    assert 0.6 * analytic < measured < analytic + 2**17 / 16
