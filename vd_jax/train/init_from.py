"""Starting a run's diffuser from earlier weights (`config.init_from`), for fine-tuning.

Two kinds of source:

- converted PyTorch weights: a diffusers VD folder or SHI-Labs' released files
  (`vd_jax.convert.load.load_models`);
- another vd_jax training run: its workdir (or that workdir's `checkpoints/` folder). The
  newest complete checkpoint gives its EMA params when that run kept an EMA and
  `config.init_from_ema` is set, else its raw params. This is how the 512^2 stage of the
  four-flow recipe continues the 256^2 run, and how a single-flow fine-tune starts from a
  four-flow run.

Only the parts this run has and the source has are taken: the time embedding (`global`), the
data layers per output modality and the context layers per context modality. A part the
source lacks (a new modality) keeps its fresh initialisation. Every taken tensor must have the
shape this run expects: a mismatch (another width, another text dim) raises naming the tensor
before anything is read. Optimizer state, step and data position always start fresh.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vd_jax.data.encoders import pretrained_models


class InitFromError(ValueError):
    """`init_from` names nothing usable, or weights that do not fit this run's diffuser."""


def run_checkpoints(path: str) -> epath.Path | None:
    """The orbax checkpoint folder of a vd_jax run at `path` (its workdir or the folder
    itself; local or a URL), or None when `path` is not a vd_jax run."""
    for d in (epath.Path(path) / "checkpoints", epath.Path(path)):
        if d.is_dir() and any(n.name.isdigit() and (n / "state").is_dir() for n in d.iterdir()):
            return d
    return None


def _parts(target: dict, source: dict) -> dict:
    """The subtrees of `target` (params by group and modality) that `source` also has."""
    out = {}
    for group, sub in target.items():
        if group not in source:
            continue
        if group == "global":
            out[group] = sub
            continue
        picked = {m: v for m, v in sub.items() if m in source[group]}
        if picked:
            out[group] = picked
    return out


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(p): x for p, x in leaves}


def _check_shapes(wanted: dict, source: dict, name: str) -> None:
    """Raises naming every tensor of `wanted` that `source` lacks or has in another shape,
    and every tensor of the source's matching parts that this run has no place for."""
    want, have = _flat(wanted), _flat(_parts(source, wanted))
    problems = [f"{k}: missing in the source" for k in want if k not in have]
    problems += [f"{k}: in the source, not in this diffuser" for k in have if k not in want]
    problems += [
        f"{k}: {tuple(have[k].shape)} in the source, {tuple(w.shape)} here"
        for k, w in want.items()
        if k in have and tuple(have[k].shape) != tuple(w.shape)
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise InitFromError(
            f"init_from={name}: {len(problems)} tensor(s) do not fit this run's diffuser (the "
            f"parts both have need the same model config):\n  {shown}{more}"
        )


def _from_run(ckpt_dir: epath.Path, abstract: dict, shardings: dict, prefer_ema: bool) -> dict:
    mngr = ocp.CheckpointManager(ckpt_dir)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise InitFromError(f"init_from={ckpt_dir}: no complete checkpoint")
    path = ckpt_dir / str(step) / "state"
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata
    key = "ema_params" if prefer_ema and tree["ema_params"] else "params"
    wanted = _parts(abstract, tree[key])
    if not wanted:
        raise InitFromError(f"init_from={ckpt_dir}: the run at step {step} has no part of ours")
    _check_shapes(wanted, tree[key], ckpt_dir)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        wanted,
        _parts(shardings, wanted),
    )
    item = {key: target}
    with jax.transfer_guard("allow"):
        out = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
    return out[key]


def _from_pytorch(folder: str, abstract: dict, shardings: dict, flows) -> dict:
    loaded = pretrained_models(folder, tuple(flows)).diffuser_params
    wanted = _parts(abstract, loaded)
    _check_shapes(wanted, loaded, folder)
    return jax.device_put(_parts(loaded, wanted), _parts(shardings, wanted))


def load(
    source: str,
    abstract: dict,
    shardings: dict,
    flows: tuple[str, ...],
    prefer_ema: bool = True,
) -> dict:
    """The parts of `abstract` (this run's params, as shapes) that `source` has, placed with
    `shardings`; graft them into the fresh params with `graft`."""
    if not epath.Path(source).is_dir():
        raise InitFromError(f"init_from={source}: no such folder")
    ckpt_dir = run_checkpoints(source)
    if ckpt_dir is not None:
        return _from_run(ckpt_dir, abstract, shardings, prefer_ema)
    return _from_pytorch(source, abstract, shardings, flows)


def graft(params: dict, loaded: dict) -> dict:
    """`params` with every subtree of `loaded` (same groups and modalities) put in."""
    out = dict(params)
    for group, sub in loaded.items():
        out[group] = sub if group == "global" else {**params[group], **sub}
    return out


def describe(loaded: dict) -> str:
    """'global, data.image, context.text'-style list of the parts taken."""
    names = []
    for group, sub in loaded.items():
        names += [group] if group == "global" else [f"{group}.{m}" for m in sub]
    return ", ".join(names)
