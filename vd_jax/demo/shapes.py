"""Captioned shapes: a tiny synthetic, seeded dataset for the CPU demo of VD.

Each image is one flat-coloured shape on a flat background colour, with a jittered position and
size and no anti-aliasing (so the pixel readers of `vd_jax.demo.attributes` are exact on it).
Each caption names the three attributes in one of several paraphrase templates, so that text
encoders see varied wording for the same content.

Attributes: `SHAPES` (4) x `COLORS` (6) for the shape x the 5 other colours for the background:
120 combinations. The held-out split is by combination: `is_heldout(shape, fg, bg)` holds 24 of
them, chosen so that every (shape, fg), (shape, bg) and (fg, bg) pair still occurs in training;
a model evaluated on held-out combinations must compose attributes it saw only separately.

`generate(n, seed=..., split=...)` is the plain numpy generator (used by tests and the demo);
`Shapes` is the TFDS builder over it (PNG bytes, TF-free), built with `build_shapes_dataset`.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vd_jax.data.tfds_builder import LocalBuilder

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
# Far apart in RGB (min pairwise distance ~150) so nearest-colour reading survives blur.
PALETTE = np.array(
    [
        [220, 40, 40],
        [40, 170, 60],
        [40, 70, 220],
        [235, 215, 40],
        [150, 50, 190],
        [240, 240, 240],
    ],
    np.uint8,
)
# Paraphrases: the wording, "background" / "backdrop" and where the shape word sits vary, but the
# shape's colour is always named before the background's. The Optimus latent binds a colour to
# its place in the sentence, not to its role: with both orders in the set (e.g. "a blue backdrop
# with a red circle in it"), image->text and text variation produced the two colours swapped in
# about a quarter of their captions (measured, README), because nothing in an image tells which
# order a caption would use.
TEMPLATES = (
    "a {fg} {shape} on a {bg} background",
    "a {fg} {shape} in front of a {bg} backdrop",
    "{fg} {shape}, {bg} background",
    "a {shape} in {fg} against a {bg} background",
    "the {shape} is {fg} and the background is {bg}",
    "there is a {fg} {shape} on a {bg} background",
    "a {fg} colored {shape} on a {bg} backdrop",
    "a {fg} {shape} with a {bg} background",
)
SPLITS = ("train", "heldout")
IMAGE_SIZE = 32
# Shape half-extent (pixels at 32 px; scaled with the image size) and centre jitter.
_RADIUS = (7.0, 10.0)
_JITTER = 3.0
# Largest half-extent of a centred shape that leaves a 4 px background border at 32 px.
MAX_RADIUS = 12.0
# A square's half side per unit radius: a bit less than the circle's bounding square, so that
# the two shapes have similar areas.
_SQUARE_SCALE = 0.85


def is_heldout(shape: int, fg: int, bg: int) -> bool:
    """Whether the attribute combination (indices into SHAPES, COLORS, COLORS) is held out.

    A fixed residue rule rather than a random draw: for any two attributes at most one value of
    the third is held out, so every pair of attribute values also occurs in training.
    """
    return (shape + fg + 2 * bg) % 5 == 0


def combinations(split: str | None = None) -> list[tuple[int, int, int]]:
    """All (shape, fg, bg) index triples with fg != bg, or those of one split."""
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    out = []
    for s, f, b in itertools.product(range(len(SHAPES)), range(len(COLORS)), range(len(COLORS))):
        if f == b:
            continue
        if split is None or is_heldout(s, f, b) == (split == "heldout"):
            out.append((s, f, b))
    return out


def caption(shape: int, fg: int, bg: int, template: int = 0) -> str:
    """The caption of a combination in one template."""
    return TEMPLATES[template].format(shape=SHAPES[shape], fg=COLORS[fg], bg=COLORS[bg])


def shape_mask(shape: int, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at (cx, cy) with half-extent `radius`.

    Pixel (i, j) is tested at its centre (j + 0.5, i + 0.5): hard edges, no anti-aliasing.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    name = SHAPES[shape]
    if name == "circle":
        return dx * dx + dy * dy <= radius * radius
    if name == "square":
        s = _SQUARE_SCALE * radius
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if name == "triangle":  # apex up, base at the bottom
        return (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    raise ValueError(f"unknown shape index {shape}")


def render(
    shape: int,
    fg: int,
    bg: int,
    *,
    size: int = IMAGE_SIZE,
    cx: float | None = None,
    cy: float | None = None,
    radius: float | None = None,
) -> np.ndarray:
    """A [size, size, 3] uint8 image; position and radius default to the centred mid size."""
    scale = size / IMAGE_SIZE
    cx = size / 2 if cx is None else cx
    cy = size / 2 if cy is None else cy
    radius = scale * sum(_RADIUS) / 2 if radius is None else radius
    img = np.empty((size, size, 3), np.uint8)
    img[:] = PALETTE[bg]
    img[shape_mask(shape, size, cx, cy, radius)] = PALETTE[fg]
    return img


def generate(
    num: int,
    *,
    seed: int,
    split: str = "train",
    image_size: int = IMAGE_SIZE,
    jitter: bool = True,
    radius: float | None = None,
) -> dict[str, np.ndarray]:
    """`num` seeded examples of one split.

    Combinations are drawn uniformly from the split's, templates uniformly from `TEMPLATES`; with
    `jitter`, centre (+-3 px at 32 px) and half-extent (7-10 px) are uniform too.

    Args:
      num: number of examples.
      seed: generator seed; the two splits use independent streams of it.
      split: "train" or "heldout".
      image_size: image side in pixels (at least 16).
      jitter: randomise position and size; False centres every shape at one size.
      radius: that size without jitter (half-extent in pixels at 32 px, at most `MAX_RADIUS`);
        None: the middle of the jitter range.

    Returns:
      dict with `image` uint8 [num, S, S, 3], `caption` object [num], int32 [num] arrays
      `shape`, `fg`, `bg`, `template`, and float32 [num] `cx`, `cy`, `radius`.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if radius is not None and (jitter or not 2.0 <= radius <= MAX_RADIUS):
        raise ValueError(
            f"radius is the fixed size of unjittered shapes, in [2, {MAX_RADIUS}] px at 32 px; "
            f"got radius={radius} with jitter={jitter}"
        )
    combos = np.asarray(combinations(split), np.int32)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    pick = combos[rng.integers(0, len(combos), num)]
    template = rng.integers(0, len(TEMPLATES), num).astype(np.int32)
    scale = image_size / IMAGE_SIZE
    centre = np.full((num, 2), image_size / 2)
    radius = np.full(num, scale * (sum(_RADIUS) / 2 if radius is None else radius))
    if jitter:
        centre = centre + rng.uniform(-_JITTER, _JITTER, (num, 2)) * scale
        radius = rng.uniform(*_RADIUS, num) * scale
    images = np.stack(
        [
            render(s, f, b, size=image_size, cx=c[0], cy=c[1], radius=r)
            for (s, f, b), c, r in zip(pick, centre, radius, strict=True)
        ]
    ) if num else np.zeros((0, image_size, image_size, 3), np.uint8)  # fmt: skip
    captions = np.array(
        [caption(*p, template=t) for p, t in zip(pick, template, strict=True)], dtype=object
    )
    return {
        "image": images,
        "caption": captions,
        "shape": pick[:, 0],
        "fg": pick[:, 1],
        "bg": pick[:, 2],
        "template": template,
        "cx": centre[:, 0].astype(np.float32),
        "cy": centre[:, 1].astype(np.float32),
        "radius": radius.astype(np.float32),
    }


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (lossless, so decoding gives the same pixels back)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] pixels of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """One seeded build of the shapes dataset.

    Attributes:
      seed: generator seed.
      num_train: examples in `train`.
      num_eval: examples in `heldout`.
      image_size: image side in pixels.
      jitter: randomise position and size.
      radius: the size of unjittered shapes (see `generate`); 0 = the default.
    """

    seed: int = 0
    num_train: int = 2048
    num_eval: int = 256
    image_size: int = IMAGE_SIZE
    jitter: bool = True
    radius: float = 0.0


class Shapes(LocalBuilder):
    """Captioned shapes as a TFDS dataset (array_record, no TensorFlow); see module docstring.

    Features: `image` (PNG bytes; decode with `decode_png`), `caption`, `key`, int `shape`,
    `fg`, `bg`, `template`. Splits: `train` and `heldout` (disjoint attribute combinations).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Four templates named the background colour first.",
        "1.1.0": "Every template names the shape's colour first; `radius` config field.",
    }
    BUILDER_CONFIGS = []

    def _info(self) -> tfds.core.DatasetInfo:
        scalar = tfds.features.Scalar(dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic captioned shapes; `image` holds PNG bytes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                    "shape": scalar,
                    "fg": scalar,
                    "bg": scalar,
                    "template": scalar,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "heldout": cfg.num_eval}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        data = generate(
            num, seed=cfg.seed, split=split, image_size=cfg.image_size, jitter=cfg.jitter,
            radius=cfg.radius or None,
        )  # fmt: skip
        for i in range(num):
            key = f"{split}_{i:06d}"
            yield (
                key,
                {
                    "image": encode_png(data["image"][i]),
                    "caption": data["caption"][i],
                    "key": key,
                    **{k: int(data[k][i]) for k in ("shape", "fg", "bg", "template")},
                },
            )


def build_shapes_dataset(
    data_dir: str,
    *,
    seed: int = 0,
    num_train: int = 2048,
    num_eval: int = 256,
    image_size: int = IMAGE_SIZE,
    jitter: bool = True,
    radius: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Generates and writes the shapes dataset as TFDS array_record files.

    Args:
      data_dir: TFDS data dir; the dataset lands in `data_dir/shapes/<config name>/<VERSION>`.
      seed: generator seed.
      num_train: examples in `train`.
      num_eval: examples in `heldout`.
      image_size: image side in pixels.
      jitter: randomise position and size.
      radius: the size of unjittered shapes (see `generate`).
      overwrite: rebuild when it exists (otherwise the saved report comes back, `reused=True`).

    Returns:
      A report: `dataset_dir` (for `tfds.builder_from_directory`), `tfds_name`, split sizes,
      the attribute vocabularies, templates, and train / held-out combinations. Also saved as
      `dataset_dir/build_report.json`.
    """
    name = f"s{seed}_n{num_train}_e{num_eval}_px{image_size}" + ("" if jitter else "_fixed")
    if radius is not None:
        name += f"_r{radius:g}".replace(".", "p")
    config = ShapesConfig(
        name=name,
        seed=seed,
        num_train=num_train,
        num_eval=num_eval,
        image_size=image_size,
        jitter=jitter,
        radius=radius or 0.0,
    )
    builder = Shapes(data_dir=data_dir, config=config)
    dataset_dir = os.fspath(builder.data_dir)
    report_path = os.path.join(dataset_dir, "build_report.json")
    if os.path.exists(report_path) and not overwrite:
        with open(report_path) as f:
            return {**json.load(f), "reused": True}
    if os.path.exists(dataset_dir):
        shutil.rmtree(dataset_dir)
        builder = Shapes(data_dir=data_dir, config=config)
    builder.download_and_prepare(file_format="array_record")
    report = {
        "dataset_dir": dataset_dir,
        "tfds_name": f"{builder.name}/{name}",
        "seed": seed,
        "image_size": image_size,
        "jitter": jitter,
        "radius": radius,
        "num_examples": {"train": num_train, "heldout": num_eval},
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "templates": list(TEMPLATES),
        "combinations": {s: [list(c) for c in combinations(s)] for s in SPLITS},
    }
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def load_split(dataset_dir: str, split: str) -> dict[str, np.ndarray]:
    """A whole built split in memory (small by design): decoded images and the other fields.

    Args:
      dataset_dir: `build_shapes_dataset(...)["dataset_dir"]`.
      split: "train" or "heldout".

    Returns:
      dict as from `generate` (without the geometry fields), plus `key`; in key order.
    """
    source = tfds.builder_from_directory(dataset_dir).as_data_source(split)
    rows = sorted((source[i] for i in range(len(source))), key=lambda r: r["key"])
    out = {"image": np.stack([decode_png(r["image"]) for r in rows])}
    for k in ("caption", "key"):
        out[k] = np.array([_text(r[k]) for r in rows], dtype=object)
    for k in ("shape", "fg", "bg", "template"):
        out[k] = np.array([r[k] for r in rows], np.int32)
    return out


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
