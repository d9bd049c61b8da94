"""PyTorch checkpoint -> Flax params: lazy readers, declarative key tables, loud failures.

A component's conversion is a list of `Rule`s (torch key, Flax path, transform)
built from its config by a table function in a sibling module. `load_params`
applies the table to a lazily read state dict and an abstract param tree
(`jax.eval_shape` of the model's init) and raises one `CheckpointError` listing
every missing, unexpected and mis-shaped key, instead of loading half a model.

No pickle code is ever executed: `.safetensors` are read with safetensors, and
`.bin`/`.pth` with vd_jax's own allow-list unpickler (torch_zip.py), which needs no
PyTorch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names every problem."""


# --------------------------------------------------------------------------- transforms


def _conv(w: np.ndarray) -> np.ndarray:  # torch [O, I, kh, kw] -> flax [kh, kw, I, O]
    return np.transpose(w, (2, 3, 1, 0))


def _conv1x1_as_dense(w: np.ndarray) -> np.ndarray:  # [O, I, 1, 1] -> [I, O]
    return np.transpose(w.reshape(w.shape[0], w.shape[1]), (1, 0))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w,
    "linear": lambda w: np.transpose(w, (1, 0)),  # torch Linear [out, in] -> [in, out]
    "conv": _conv,
    "conv1x1_as_dense": _conv1x1_as_dense,
}


def _transformed_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape after `transform`, or None if the transform cannot apply to that rank."""
    if transform == "identity":
        return shape
    if transform == "linear":
        return (shape[1], shape[0]) if len(shape) == 2 else None
    if transform == "conv":
        return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else None
    if transform == "conv1x1_as_dense":
        return (shape[1], shape[0]) if len(shape) == 4 and shape[2:] == (1, 1) else None
    raise KeyError(transform)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: torch key `src` -> '/'-joined Flax param path `dst` via `transform`."""

    src: str
    dst: str
    transform: str = "identity"


# Table-building shorthands: each expands one torch module into its Rules.


def linear(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "linear")]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def conv(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "conv")]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def conv1x1_as_dense(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "conv1x1_as_dense")]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def norm(src: str, dst: str) -> list[Rule]:
    """GroupNorm / LayerNorm: torch weight -> flax scale."""
    return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def embedding(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/embedding")]


Shorthand = Callable[[str, str], list[Rule]]


def repeated(src: str, dst: str, count: int, layer: Sequence[tuple[Shorthand, str]]) -> list[Rule]:
    """The rules of `count` alike layers, from the table of one.

    Args:
      src: torch name of the layer list; layer `i` is `{src}.{i}`.
      dst: Flax path of the layers without the index; layer `i` is `{dst}_{i}`.
      count: how many layers.
      layer: (shorthand, torch module name inside the layer) per module, in table order;
        the Flax path inside the layer is the torch name with '/' for '.'.

    Returns:
      The rules of layer 0, then layer 1, and so on.
    """
    rules: list[Rule] = []
    for i in range(count):
        for shorthand, name in layer:
            rules += shorthand(f"{src}.{i}.{name}", f"{dst}_{i}/{name.replace('.', '/')}")
    return rules


# --------------------------------------------------------------------------- state dicts


class StateDict(Mapping[str, np.ndarray]):
    """A read-only, lazy view of tensors: shapes without reading, arrays on access."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        getter: Callable[[str], np.ndarray],
        source: str,
        dtypes: Mapping[str, str] | None = None,
    ):
        self._shapes = dict(shapes)
        self._getter = getter
        self._dtypes = dict(dtypes or {})
        self.source = source

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self._getter(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str | None:
        return self._dtypes.get(key)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], source: str = "<memory>") -> StateDict:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return cls(
            {k: tuple(v.shape) for k, v in arrays.items()},
            arrays.__getitem__,
            source,
            {k: str(v.dtype) for k, v in arrays.items()},
        )

    def prefixed(self, prefix: str) -> StateDict:
        """The same tensors with `prefix` put in front of every key."""
        return StateDict(
            {prefix + k: s for k, s in self._shapes.items()},
            lambda k: self._getter(k[len(prefix) :]),
            self.source,
            {prefix + k: d for k, d in self._dtypes.items()},
        )

    def without(self, pattern: str) -> StateDict:
        """A view without the keys that fully match the regex `pattern` (buffers, say)."""
        rx = re.compile(pattern)
        keep = {k: s for k, s in self._shapes.items() if not rx.fullmatch(k)}
        return StateDict(keep, self._getter, self.source, self._dtypes)

    def under(self, prefix: str) -> StateDict:
        """A view of only the keys that start with `prefix` (all of them when it is "")."""
        return self.without(f"(?!{re.escape(prefix)}).*") if prefix else self


def merge(*dicts: StateDict) -> StateDict:
    """One view over several state dicts whose keys are disjoint (prefix them first)."""
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, StateDict] = {}
    dtypes: dict[str, str] = {}
    for d in dicts:
        for k in d:
            if k in owner:
                raise CheckpointError(f"key {k!r} is in both {owner[k].source} and {d.source}")
            shapes[k], owner[k] = d.shape(k), d
            if d.dtype(k):
                dtypes[k] = d.dtype(k)
    return StateDict(shapes, lambda k: owner[k][k], " + ".join(d.source for d in dicts), dtypes)


_SAFETENSORS_DTYPES = {
    "F16": "float16",
    "F32": "float32",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
}


def _read_safetensors(path: str) -> StateDict:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="numpy")
        keys = list(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
        dtypes = {k: _SAFETENSORS_DTYPES.get(handle.get_slice(k).get_dtype(), "?") for k in keys}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"
        ) from None

    def get(key: str) -> np.ndarray:
        try:
            if dtypes[key] == "bfloat16":  # numpy has no bf16: read through ml_dtypes
                import ml_dtypes

                raw = handle.get_slice(key)
                return np.asarray(raw[:]).view(ml_dtypes.bfloat16).reshape(shapes[key])
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(
                f"{path}: tensor {key!r} cannot be read ({type(e).__name__}: {e})"
            ) from None

    return StateDict(shapes, get, path, dtypes)


def _read_torch(path: str) -> StateDict:
    from vd_jax.convert.torch_zip import TorchZipFile

    try:
        archive = TorchZipFile(path)
    except Exception as e:  # UnsafePickleError, a damaged zip, a broken pickle
        raise CheckpointError(f"{path}: refused or unreadable PyTorch file ({e})") from None

    def get(key: str) -> np.ndarray:
        try:
            return archive.read(key)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {key!r} cannot be read ({e})") from None

    refs = archive.tensors
    return StateDict(
        {k: r.shape for k, r in refs.items()},
        get,
        path,
        {
            k: str(np.dtype(r.storage.dtype)) if r.storage.dtype != "bfloat16" else "bfloat16"
            for k, r in refs.items()
        },
    )


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Opens a `.safetensors`, `.bin`, `.pt` or `.pth` checkpoint lazily."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _read_torch(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt or .pth)"
    )


# --------------------------------------------------------------------------- applying tables


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}


def _listing(title: str, items: Sequence[str], limit: int = 25) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def load_params(
    state: StateDict,
    rules: Iterable[Rule],
    abstract_params: Mapping[str, Any],
    *,
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
) -> dict[str, Any]:
    """Fills `abstract_params` from `state` through `rules`, or raises `CheckpointError`.

    Args:
      state: the (lazy) torch state dict.
      rules: the component's key table.
      abstract_params: nested dict of `jax.ShapeDtypeStruct` (from `jax.eval_shape`);
        its dtypes are the dtypes of the result.
      ignore: regexes of torch keys that carry no learned weights (buffers).
      what: names the component in error messages.

    Returns:
      Nested dict of numpy arrays with exactly the structure of `abstract_params`.
    """
    rules = list(rules)
    target = flatten(abstract_params)
    # Every problem is checked before any tensor is read, so one error names all of them.
    problems = _file_problems(state, rules, target, ignore) + _table_problems(rules, target)
    if problems:
        raise CheckpointError(f"cannot load {what} from {state.source}:\n" + "\n".join(problems))
    flat = {}
    for r in rules:
        arr = TRANSFORMS[r.transform](np.asarray(state[r.src]))
        flat[r.dst] = np.ascontiguousarray(arr).astype(target[r.dst].dtype, copy=False)
    return unflatten(flat)


def _listings(sections: Iterable[tuple[str, Sequence[str]]]) -> list[str]:
    return [_listing(title, items) for title, items in sections if items]


def _file_problems(
    state: StateDict, rules: Sequence[Rule], target: Mapping[str, Any], ignore: Sequence[str]
) -> list[str]:
    """Where the file disagrees with the table: missing, unexpected, mis-shaped, non-float keys."""
    ignore_rx = [re.compile(p) for p in ignore]
    src_used = {r.src for r in rules}
    missing = [r.src for r in rules if r.src not in state]
    unexpected = sorted(
        k for k in state if k not in src_used and not any(rx.fullmatch(k) for rx in ignore_rx)
    )
    bad_shape = []
    for r in rules:
        if r.src in state and r.dst in target:
            got = _transformed_shape(r.transform, state.shape(r.src))
            want = tuple(target[r.dst].shape)
            if got != want:
                bad_shape.append(
                    f"{r.src} {list(state.shape(r.src))} -> {r.dst}: expected {list(want)}"
                )
    bad_dtype = sorted(
        f"{r.src}: {state.dtype(r.src)}"
        for r in rules
        if r.src in state and state.dtype(r.src) and state.dtype(r.src) not in _FLOAT_DTYPES
    )
    return _listings(
        [
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", bad_shape),
            ("wrong dtypes (weights must be floating point)", bad_dtype),
        ]
    )


def _table_problems(rules: Sequence[Rule], target: Mapping[str, Any]) -> list[str]:
    """Where the table disagrees with the model."""
    # These are bugs in the table or a config that does not match the file: say so.
    mapped: set[str] = set()
    dup = []
    for r in rules:
        if r.dst in mapped:
            dup.append(r.dst)
        mapped.add(r.dst)
    return _listings(
        [
            ("params written twice by the key table", dup),
            (
                "model params no key maps to (config does not match the file?)",
                sorted(p for p in target if p not in mapped),
            ),
            (
                "key-table targets the model does not have",
                sorted(r.dst for r in rules if r.dst not in target),
            ),
        ]
    )


# --------------------------------------------------------------------------- writing tables back


def _conv_back(w: np.ndarray) -> np.ndarray:  # flax [kh, kw, I, O] -> torch [O, I, kh, kw]
    return np.transpose(w, (3, 2, 0, 1))


def _dense_as_conv1x1(w: np.ndarray) -> np.ndarray:  # [I, O] -> [O, I, 1, 1]
    return np.transpose(w, (1, 0)).reshape(w.shape[1], w.shape[0], 1, 1)


# The inverse of each of `TRANSFORMS`: pure transposes and reshapes, so a round trip is exact.
INVERSE_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w,
    "linear": lambda w: np.transpose(w, (1, 0)),
    "conv": _conv_back,
    "conv1x1_as_dense": _dense_as_conv1x1,
}


def export_state(
    rules: Iterable[Rule],
    params: Mapping[str, Any],
    dtype: Any = None,
    *,
    what: str = "params",
) -> dict[str, np.ndarray]:
    """The torch state dict the key table `rules` reads `params` from: `load_params` inverted.

    Args:
      rules: the component's key table (the same one its loader uses).
      params: nested or '/'-flat dict of arrays (numpy or jax) holding every `Rule.dst`;
        params no rule names are left out.
      dtype: dtype of the returned tensors (default: each param's own).
      what: names the component in error messages.

    Returns:
      {torch key: C-contiguous numpy array}, in table order.

    Raises:
      CheckpointError: naming every param the table needs that `params` lacks.
    """
    rules = list(rules)
    flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else params
    missing = [r.dst for r in rules if r.dst not in flat]
    if missing:
        raise CheckpointError(f"cannot export {what}:\n" + _listing("params missing", missing))
    out: dict[str, np.ndarray] = {}
    for r in rules:
        arr = INVERSE_TRANSFORMS[r.transform](np.asarray(flat[r.dst]))
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        out[r.src] = np.require(arr, requirements="C")  # not ascontiguousarray: keeps 0-d
    return out
