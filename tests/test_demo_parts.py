"""The shapes demo's foundations: dataset, attribute readers, split, TFDS build, pre-training."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vd_jax.demo import attributes, pretrain, pretrain_clip, shapes


@pytest.fixture(scope="module")
def train_data():
    return shapes.generate(256, seed=0, split="train")


def test_image_reader_exact_on_generated_images():
    for split in shapes.SPLITS:
        data = shapes.generate(200, seed=7, split=split)
        for i in range(200):
            want = attributes.attributes_of(data["shape"][i], data["fg"][i], data["bg"][i])
            assert attributes.read_image_attributes(data["image"][i]) == want, (split, i)
            # Floats in [0, 1] (decoded images) read the same.
            assert attributes.read_image_attributes(data["image"][i] / 255.0) == want


def test_image_reader_exact_on_every_shape_at_the_extremes_of_jitter():
    lo, hi = shapes._RADIUS
    j = shapes._JITTER
    for s, f, b in shapes.combinations():
        for r, dx, dy in itertools.product((lo, hi), (-j, j), (-j, j)):
            img = shapes.render(s, f, b, cx=16 + dx, cy=16 + dy, radius=r)
            assert attributes.read_image_attributes(img) == attributes.attributes_of(s, f, b)


@pytest.mark.parametrize("radius", [4.0, shapes.MAX_RADIUS])
def test_image_reader_exact_on_fixed_size_shapes(radius):
    # The demo's setting: every shape centred at one size (jitter=False, radius=...).
    for split in shapes.SPLITS:
        data = shapes.generate(60, seed=3, split=split, jitter=False, radius=radius)
        assert np.all(data["radius"] == radius)
        for i in range(60):
            want = attributes.attributes_of(data["shape"][i], data["fg"][i], data["bg"][i])
            assert attributes.read_image_attributes(data["image"][i]) == want, (split, i)
            # The border the background reader uses stays background.
            img = data["image"][i]
            assert np.all(img[:4] == shapes.PALETTE[data["bg"][i]])
            assert np.all(img[-4:] == shapes.PALETTE[data["bg"][i]])


def test_fixed_radius_is_checked():
    with pytest.raises(ValueError, match="radius"):
        shapes.generate(4, seed=0, jitter=True, radius=8.0)
    with pytest.raises(ValueError, match="radius"):
        shapes.generate(4, seed=0, jitter=False, radius=shapes.MAX_RADIUS + 1)


def test_text_reader_exact_on_every_template_and_combination():
    for (s, f, b), t in itertools.product(shapes.combinations(), range(len(shapes.TEMPLATES))):
        text = shapes.caption(s, f, b, template=t)
        assert attributes.read_text_attributes(text) == attributes.attributes_of(s, f, b), text
        assert attributes.read_text_attributes(text.upper() + ".") == attributes.attributes_of(
            s, f, b
        )


def test_text_reader_partial_captions():
    assert attributes.read_text_attributes("a red circle") == {
        "shape": "circle",
        "fg": "red",
        "bg": None,
    }
    assert attributes.read_text_attributes("nothing here") == {
        "shape": None,
        "fg": None,
        "bg": None,
    }


def test_split_holds_out_whole_combinations():
    train, held = set(shapes.combinations("train")), set(shapes.combinations("heldout"))
    assert not train & held
    assert len(train | held) == len(shapes.SHAPES) * len(shapes.COLORS) * (len(shapes.COLORS) - 1)
    # Every pair of attribute values of a held-out combination occurs in training.
    for i, j in itertools.combinations(range(3), 2):
        seen = {(c[i], c[j]) for c in train}
        assert all((c[i], c[j]) in seen for c in held)
    for split, combos in (("train", train), ("heldout", held)):
        data = shapes.generate(300, seed=1, split=split)
        got = set(
            zip(data["shape"].tolist(), data["fg"].tolist(), data["bg"].tolist(), strict=True)
        )
        assert got <= combos


def test_generator_is_seeded():
    a, b = shapes.generate(20, seed=3), shapes.generate(20, seed=3)
    c = shapes.generate(20, seed=4)
    assert np.array_equal(a["image"], b["image"]) and list(a["caption"]) == list(b["caption"])
    assert not np.array_equal(a["image"], c["image"])


def test_tfds_build_reads_back_identical_bytes(tmp_path):
    report = shapes.build_shapes_dataset(str(tmp_path), seed=2, num_train=24, num_eval=8)
    assert report["num_examples"] == {"train": 24, "heldout": 8}
    for split, n in (("train", 24), ("heldout", 8)):
        want = shapes.generate(n, seed=2, split=split)
        got = shapes.load_split(report["dataset_dir"], split)
        assert np.array_equal(got["image"], want["image"])
        assert list(got["caption"]) == list(want["caption"])
        for k in ("shape", "fg", "bg", "template"):
            assert np.array_equal(got[k], want[k])
    import tensorflow_datasets as tfds

    row = tfds.builder_from_directory(report["dataset_dir"]).as_data_source("train")[0]
    assert shapes.encode_png(shapes.decode_png(row["image"])) == row["image"]
    again = shapes.build_shapes_dataset(str(tmp_path), seed=2, num_train=24, num_eval=8)
    assert again["reused"]


def _falls(metrics):
    first, last = metrics["first_loss"], metrics["final_loss"]
    assert np.isfinite(last) and last < first, metrics["history"]


def test_vae_pretraining_lowers_loss(train_data):
    cfg = pretrain.tiny_vae_config(block_out_channels=(8, 16), latent_channels=2)
    r = pretrain.train_vae(train_data, cfg, steps=12, batch_size=4, lr=3e-3)
    _falls(r.metrics)
    assert r.config.scaling_factor == pytest.approx(1.0 / r.metrics["latent_std"])
    acc = pretrain.vae_attribute_accuracy(r.config, r.params, shapes.generate(4, seed=0))
    assert set(acc) == {"shape", "fg", "bg", "all"}


def test_optimus_pretraining_lowers_loss(train_data):
    configs = pretrain.tiny_optimus_configs(latent_size=8, hidden=32, layers=1)
    r = pretrain.train_optimus(train_data, configs, steps=12, batch_size=8, lr=3e-3)
    _falls(r.metrics)
    assert set(r.params) == {"encoder", "decoder"}
    acc = pretrain.optimus_attribute_accuracy(r.config, r.params, shapes.generate(4, seed=0))
    assert 0.0 <= acc["all"] <= 1.0


def test_optimus_paraphrase_targets(train_data):
    """paraphrase_prob: decoder targets are other wordings of the same attribute combination."""
    data = {k: np.asarray(v) for k, v in shapes.generate(64, seed=3).items()}
    alt = pretrain.paraphrases(data, seed=0)
    combos = zip(data["shape"], data["fg"], data["bg"], strict=True)
    want = [attributes.attributes_of(*t) for t in combos]
    assert [attributes.read_text_attributes(a) for a in alt] == want
    reworded = np.mean([a != str(c) for a, c in zip(alt, data["caption"], strict=True)])
    assert reworded > 0.6  # 7 of 8 templates differ from the caption's own
    assert alt != pretrain.paraphrases(data, seed=1)
    with pytest.raises(ValueError, match=r"missing \['bg', 'fg', 'shape'\]"):
        pretrain.paraphrases({"caption": data["caption"]})
    configs = pretrain.tiny_optimus_configs(latent_size=8, hidden=32, layers=1)
    with pytest.raises(ValueError, match="paraphrase_prob must be in"):
        pretrain.train_optimus(train_data, configs, steps=1, paraphrase_prob=1.5)
    r = pretrain.train_optimus(
        train_data, configs, steps=12, batch_size=8, lr=3e-3, paraphrase_prob=0.5
    )
    _falls(r.metrics)
    # The targets reach the loss: same draws of z (both split the key), only the targets differ.
    first = [
        pretrain.train_optimus(
            train_data, configs, steps=1, batch_size=8, paraphrase_prob=p
        ).metrics["first_loss"]
        for p in (1e-9, 1.0)
    ]
    assert first[0] != first[1]


def test_clip_pretraining_lowers_loss(train_data):
    configs = pretrain_clip.tiny_clip_configs(hidden=32, layers=1, projection_dim=16, patch_size=8)
    r = pretrain_clip.train_clip(train_data, configs, steps=12, batch_size=16, lr=3e-3)
    _falls(r.metrics)
    acc = pretrain_clip.clip_retrieval_accuracy(r.config, r.params, shapes.generate(8, seed=0))
    assert 0.0 <= acc["all"] <= acc["among_split"] <= 1.0
    held = shapes.generate(8, seed=0, split="heldout")
    r = pretrain_clip.train_clip(
        train_data, configs, eval_data=held, steps=2, batch_size=16, lr=3e-3
    )
    assert set(r.metrics["probe_accuracy"]) == {"shape", "fg", "bg", "all"}
    assert r.metrics["probe_accuracy"] == pretrain_clip.clip_attribute_probe(
        configs, r.params, train_data, held
    )


def test_linear_probe_reads_compositional_features_on_unseen_combinations():
    train = {k: np.asarray(v) for k, v in shapes.generate(400, seed=1, split="train").items()}
    held = {k: np.asarray(v) for k, v in shapes.generate(100, seed=1, split="heldout").items()}
    keys = ("shape", "fg", "bg")
    rng = np.random.default_rng(0)
    # One random direction per attribute value, summed: every attribute linear and independent.
    codes = {k: rng.normal(size=(8, 24)) for k in keys}
    additive = lambda d: sum(codes[k][d[k]] for k in keys)  # noqa: E731
    labels = lambda d: {k: d[k] for k in keys}  # noqa: E731
    acc = pretrain_clip.linear_probe_accuracy(
        additive(train), labels(train), additive(held), labels(held)
    )
    assert acc == {"shape": 1.0, "fg": 1.0, "bg": 1.0, "all": 1.0}
    # One random code per whole combination: nothing carries over to unseen combinations.
    combo = {c: rng.normal(size=24) for c in shapes.combinations()}

    def entangled(d):
        return np.stack([combo[t] for t in zip(*(d[k] for k in keys), strict=True)])

    acc = pretrain_clip.linear_probe_accuracy(
        entangled(train), labels(train), entangled(held), labels(held)
    )
    assert acc["all"] < 0.3, acc


def test_clip_shape_group_batches_hold_one_colour_pair_in_every_shape(train_data):
    sample = pretrain_clip._shape_group_sampler(train_data, 16)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = sample(rng)
        assert idx.shape == (16,)
        pairs = list(zip(train_data["fg"][idx], train_data["bg"][idx], strict=True))
        # Groups are contiguous: one colour pair, then the next; within a (complete) group every
        # shape the training split has for that pair appears once.
        first = pairs[0]
        group = [i for i, p in zip(idx, pairs, strict=True) if p == first][:4]
        have = {
            int(s)
            for s, f, b in zip(train_data["shape"], train_data["fg"], train_data["bg"], strict=True)
            if (f, b) == first
        }
        assert sorted(int(train_data["shape"][i]) for i in group[: len(have)]) == sorted(have)
    configs = pretrain_clip.tiny_clip_configs(hidden=32, layers=1, projection_dim=16, patch_size=8)
    r = pretrain_clip.train_clip(
        train_data, configs, steps=12, batch_size=16, lr=3e-3, shape_groups=True
    )
    _falls(r.metrics)
