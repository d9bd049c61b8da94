"""The diffuser's layer order: which data and context blocks run where, and their widths.

Both data types (image, text) walk the same plan, SD-v1's U-Net order (VD's `layer_order`);
numbering data and context blocks in it reproduces the original's `data_blocks.{i}` /
`context_blocks.{j}` indices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vd_jax.models.unet import DiffuserConfig


@dataclasses.dataclass(frozen=True)
class Step:
    """One slot of the shared layer order: 'd' data block, 'c' context block, 'save', 'load'."""

    op: str
    index: int = -1  # data-block index for 'd', context-block index for 'c'
    kind: str = ""  # for 'd': 'in', 'res', 'down', 'up' or 'out'
    in_ch: int = 0  # width entering a 'd' block (skip included)
    out_ch: int = 0  # width after a 'd' or 'c' block (0 for 'out': the latent's own)


@functools.lru_cache(maxsize=32)
def layer_plan(config: DiffuserConfig) -> tuple[Step, ...]:
    """The d/c/save/load order both data types follow (VD's `layer_order`, SD-v1's U-Net).

    Numbering data and context blocks in this order reproduces the original's
    new-format `data_blocks.{i}` / `context_blocks.{j}` indices.
    """
    steps: list[Step] = []
    widths = [config.model_channels * m for m in config.channel_mult]
    cur = 0  # width of h at this point of the walk
    saved: list[int] = []  # widths of the saved skips

    def d(kind: str, ch: int):
        nonlocal cur
        steps.append(Step("d", sum(s.op == "d" for s in steps), kind, cur, ch))
        cur = ch

    def c():
        steps.append(Step("c", sum(s.op == "c" for s in steps), "", cur, cur))

    def save():
        steps.append(Step("save"))
        saved.append(cur)

    def load():
        nonlocal cur
        steps.append(Step("load"))
        cur += saved.pop()

    d("in", widths[0])
    save()
    for level, ch in enumerate(widths):
        for _ in range(config.num_res_blocks):
            d("res", ch)
            if config.attention_levels[level]:
                c()
            save()
        if level != config.num_levels - 1:
            d("down", ch)
            save()
    d("res", widths[-1])
    c()
    d("res", widths[-1])
    for level in reversed(range(config.num_levels)):
        for _ in range(config.num_res_blocks + 1):
            load()
            d("res", widths[level])
            if config.attention_levels[level]:
                c()
        if level != 0:
            d("up", widths[level])
    d("out", 0)
    return tuple(steps)


def data_steps(config: DiffuserConfig) -> tuple[Step, ...]:
    """The 'd' steps of `layer_plan`: data block i is `data_steps(config)[i]`."""
    return tuple(s for s in layer_plan(config) if s.op == "d")


def context_widths(config: DiffuserConfig) -> tuple[int, ...]:
    """Channel width of each context block, in order."""
    return tuple(s.out_ch for s in layer_plan(config) if s.op == "c")
