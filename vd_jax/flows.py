"""The one table of VD's flows: what each produces, what conditions it, what it needs loaded.

Every other list of flows derives from `FLOWS`: the trainer's objective (the `trainable`
ones, in this order, which also fixes each flow's noise stream), the loaders (which diffuser
parts, CLIP towers and Optimus halves to read) and ``sample.py``'s validation (which inputs a
flow asks for). A flow is one output modality (the diffuser's *data* layers) under one or
two conditioning modalities (its *context* layers):

=================  ======  =============  ==========  ==============  =========
flow               data    contexts       inputs      Optimus         trainable
=================  ======  =============  ==========  ==============  =========
text_to_image      image   text           prompt                      yes
image_variation    image   image          image                       yes
image_to_text      text    image          image       decoder         yes
text_variation     text    text           prompt      decoder         yes
dual_guided        image   image, text    both                        yes
multi_context      image   image, text    image (+p)                  no
i2t2i              image   image, text    image       encoder+decoder no
=================  ======  =============  ==========  ==============  =========

``dual_guided`` is image data under a mix of both contexts (the trainer mixes them with
``config.dual_ratio``); ``multi_context`` blends several images and prompts at sampling
time; ``i2t2i`` (image -> text -> edited text -> image) runs image_to_text, then dual_guided.
The old training name ``dual_context`` is accepted as an alias of ``dual_guided``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

DATA_TYPES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class Flow:
    """One row of the table.

    Attributes:
      name: the one name, in configs, metrics, sample.py and the loaders.
      data: the modality it generates ('image' | 'text').
      contexts: the modalities that condition it.
      prompt: whether sampling takes a prompt (required unless `image` also is).
      image: whether sampling takes an input image.
      optimus: the Optimus halves sampling needs ('encoder' / 'decoder').
      trainable: whether the training objective has a loss for it.
      runs: for composite flows, the flows it runs (their diffuser parts are loaded).
    """

    name: str
    data: str
    contexts: tuple[str, ...]
    prompt: bool = False
    image: bool = False
    optimus: tuple[str, ...] = ()
    trainable: bool = True
    runs: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        """The diffuser param parts it reads (the names of `models.unet.ALL_PARTS`)."""
        if self.runs:
            return _union(FLOWS[r].parts for r in self.runs)
        return ("global", f"data/{self.data}", *(f"context/{c}" for c in self.contexts))

    @property
    def needs_clip_text(self) -> bool:
        return "text" in self.contexts

    @property
    def needs_clip_vision(self) -> bool:
        return "image" in self.contexts


def _union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for g in groups for p in g))


FLOWS: dict[str, Flow] = {
    f.name: f
    for f in (
        Flow("text_to_image", "image", ("text",), prompt=True),
        Flow("image_variation", "image", ("image",), image=True),
        Flow("image_to_text", "text", ("image",), image=True, optimus=("decoder",)),
        Flow("text_variation", "text", ("text",), prompt=True, optimus=("decoder",)),
        Flow("dual_guided", "image", ("image", "text"), prompt=True, image=True),
        Flow("multi_context", "image", ("image", "text"), image=True, trainable=False),
        Flow(
            "i2t2i",
            "image",
            ("image", "text"),
            image=True,
            optimus=("encoder", "decoder"),
            trainable=False,
            runs=("image_to_text", "dual_guided"),
        ),
    )
}
ALIASES = {"dual_context": "dual_guided"}
TRAINABLE = tuple(n for n, f in FLOWS.items() if f.trainable)
IMAGE_FLOWS = tuple(n for n in TRAINABLE if FLOWS[n].data == "image")  # a folder's default


def canonical(name: str, *, trainable: bool = False) -> str:
    """`name` or its alias resolved; an unknown name raises one error listing the choices."""
    name = ALIASES.get(name, name)
    choices = TRAINABLE if trainable else tuple(FLOWS)
    if name not in choices:
        what = "trainable flow" if trainable else "flow"
        raise ValueError(f"unknown {what} {name!r}; choose from {list(choices)}")
    return name


def get(name: str) -> Flow:
    """The row of `name` (aliases accepted)."""
    return FLOWS[canonical(name)]


def check(names: Iterable[str], *, trainable: bool = False) -> tuple[str, ...]:
    """Canonical names, in table order, duplicates dropped; unknown or no names raise."""
    names = [canonical(n, trainable=trainable) for n in names]
    if not names:
        raise ValueError(f"no flows given; choose from {list(FLOWS)}")
    return tuple(n for n in FLOWS if n in names)


def parts(names: Iterable[str]) -> tuple[str, ...]:
    """The diffuser parts that a set of flows reads."""
    return _union(get(n).parts for n in names)


def needed_inputs(names: Iterable[str]) -> set[str]:
    """Batch entries the flows' losses read: 'image_latent', 'text_latent', '*_context'."""
    need: set[str] = set()
    for n in names:
        f = get(n)
        need.add(f"{f.data}_latent")
        need.update(f"{c}_context" for c in f.contexts)
    return need


def entry(table: Mapping[str, Any], name: str) -> Any:
    """`table[name]` for a per-flow config table keyed by the name or one of its aliases."""
    for key in (name, *(a for a, c in ALIASES.items() if c == name)):
        if key in table:
            return table[key]
    raise KeyError(f"no entry for flow {name!r} in {sorted(table)}")
