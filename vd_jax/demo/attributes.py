"""Attribute readers for the shapes demo: (shape, fg, bg) from pixels and from captions.

Pixels: every pixel gets its nearest palette colour; the background is the majority colour of the
image border (shapes never touch it), the foreground the majority of the other pixels. The shape
mask (pixels nearer the foreground than the background colour) is classified by two statistics of
its bounding box: the fill ratio (square ~1, circle ~pi/4, triangle and diamond ~1/2) and the
ratio of the mean row width in the top half to that in the bottom half (triangle, apex up, ~1/3;
diamond ~1). Exact on `vd_jax.demo.shapes` images, tolerant of blur and stray pixels.

Text: attribute words are found by word; each colour word is assigned to the shape or to the
background word ("background" / "backdrop") by the pairing with the smallest word distance, which
reads every template of `vd_jax.demo.shapes.TEMPLATES` whatever its word order.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from vd_jax.demo.shapes import _SQUARE_SCALE, COLORS, PALETTE, SHAPES, shape_mask

_BACKGROUND_WORDS = ("background", "backdrop")
# Fewer foreground pixels than this: no shape.
_MIN_AREA = 4


def _to_uint8_range(image) -> np.ndarray:
    """float [H, W, 3] in 0..255 from uint8 pixels or floats in [0, 1]."""
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected one [H, W, 3] image, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32)
    return np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0


def color_labels(image) -> np.ndarray:
    """[H, W] index of the nearest `PALETTE` colour of every pixel."""
    x = _to_uint8_range(image)
    d = ((x[:, :, None, :] - PALETTE[None, None].astype(np.float32)) ** 2).sum(-1)
    return np.argmin(d, axis=-1)


def _fitted_radius(name: str, area: float) -> float:
    """The `shape_mask` radius of a shape with this pixel area."""
    if name == "circle":
        return float(np.sqrt(area / np.pi))
    if name == "square":
        return float(np.sqrt(area) / 2 / _SQUARE_SCALE)
    return float(np.sqrt(area / 2))  # triangle and diamond: area 2 r^2


def classify_mask(mask: np.ndarray) -> str | None:
    """The shape name of a boolean mask, or None when it is (nearly) empty.

    Each shape is drawn with the mask's area and centroid (both robust to stray pixels and
    rasterisation, unlike a bounding box); the one with the highest IoU wins.
    """
    area = int(mask.sum())
    if area < _MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    best, best_iou = None, -1.0
    for index, name in enumerate(SHAPES):
        r = _fitted_radius(name, area)
        # A triangle's centroid lies a third of its radius below the centre of its box.
        oy = r / 3 if name == "triangle" else 0.0
        t = shape_mask(index, mask.shape[0], cx, cy - oy, r)
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = name, iou
    return best


def read_image_attributes(image) -> dict[str, str | None]:
    """Shape, shape colour and background colour of one image.

    Args:
      image: [H, W, 3] uint8 pixels, or floats in [0, 1] (e.g. a decoded image).

    Returns:
      dict with `shape` (a `SHAPES` name or None when no shape is visible), `fg` and `bg`
      (`COLORS` names; `fg` None when no pixel differs from the background).
    """
    labels = color_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(COLORS)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(COLORS))
    counts[bg] = 0
    if counts.sum() == 0:
        return {"shape": None, "fg": None, "bg": COLORS[bg]}
    fg = int(counts.argmax())
    # Segment by the nearer of the two colours: blurred edge pixels whose nearest palette entry
    # is a third colour still fall on the right side.
    x = _to_uint8_range(image)
    d_fg = ((x - PALETTE[fg].astype(np.float32)) ** 2).sum(-1)
    d_bg = ((x - PALETTE[bg].astype(np.float32)) ** 2).sum(-1)
    return {"shape": classify_mask(d_fg < d_bg), "fg": COLORS[fg], "bg": COLORS[bg]}


def read_text_attributes(text: str) -> dict[str, str | None]:
    """Shape, shape colour and background colour named in a caption.

    Args:
      text: a caption (any case and punctuation).

    Returns:
      dict with `shape`, `fg`, `bg`: the attribute words, None where the caption names none
      (or, for colours, where it gives no way to tell which is which).
    """
    words = re.findall(r"[a-z]+", text.lower())
    shape_pos = [i for i, w in enumerate(words) if w in SHAPES]
    back_pos = [i for i, w in enumerate(words) if w in _BACKGROUND_WORDS]
    colors = [(i, w) for i, w in enumerate(words) if w in COLORS]
    out: dict[str, str | None] = {
        "shape": words[shape_pos[0]] if shape_pos else None,
        "fg": None,
        "bg": None,
    }
    anchors = {"fg": shape_pos[0] if shape_pos else None, "bg": back_pos[0] if back_pos else None}
    roles = [r for r, pos in anchors.items() if pos is not None]
    if not colors or not roles:
        return out
    # Give each role at most one colour word, minimising the summed word distance to the anchors.
    best, best_cost = (), None
    k = min(len(roles), len(colors))
    for chosen in itertools.permutations(colors, k):
        for role_set in itertools.combinations(roles, k):
            cost = sum(abs(c[0] - anchors[r]) for c, r in zip(chosen, role_set, strict=True))
            if best_cost is None or cost < best_cost:
                best, best_cost = tuple(zip(role_set, chosen, strict=True)), cost
    for role, (_, word) in best:
        out[role] = word
    return out


def attributes_of(shape: int, fg: int, bg: int) -> dict[str, str]:
    """The attribute dict of index triples, as the readers return it."""
    return {"shape": SHAPES[shape], "fg": COLORS[fg], "bg": COLORS[bg]}


def attribute_accuracy(
    read: list[dict[str, str | None]], truth: list[dict[str, str]]
) -> dict[str, float]:
    """Per-attribute and all-three accuracy of read attributes against the truth."""
    n = max(len(truth), 1)
    if len(read) != len(truth):
        raise ValueError(f"{len(read)} readings for {len(truth)} examples")
    acc = {k: sum(r[k] == t[k] for r, t in zip(read, truth, strict=True)) / n for k in truth[0]}
    acc["all"] = sum(r == t for r, t in zip(read, truth, strict=True)) / n
    return acc
