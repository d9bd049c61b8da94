"""Reading PyTorch `.pth`/`.bin` files without PyTorch and without running pickle code.

`torch.save` writes a zip: `<name>/data.pkl` (a pickle of the state dict whose
tensors point at storages) and `<name>/data/<key>` (the raw, uncompressed
storage bytes). The pickle is read with an unpickler that knows a dozen names
(OrderedDict, the tensor-rebuild functions, the storage dtypes) and refuses
every other global, so a file that carries code fails instead of running it.
Tensor bytes are memory-mapped and copied one tensor at a time: converting a
checkpoint needs about the output's memory, not twice it.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class UnsafePickleError(ValueError):
    """The pickle names a global outside the allow-list (it could run code)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: object
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where a tensor's elements lie: storage, element offset, shape and strides."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"the pickle refers to {module}.{name}, which is not a tensor or a plain "
                "container: refusing to load it (it could execute code)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        return _Storage(str(key), _STORAGE_DTYPES[storage_type.name], int(numel))


def _flatten_tensors(obj, prefix: str = "") -> dict[str, TensorRef]:
    """Nested dicts of tensors -> {dotted key: TensorRef}; other leaves are dropped."""
    out: dict[str, TensorRef] = {}
    if isinstance(obj, TensorRef):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class TorchZipFile:
    """A `torch.save` zip opened for reading tensors as numpy arrays."""

    def __init__(self, path: str):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise ValueError(
                "not a zip-format PyTorch file (truncated, or saved by torch < 1.6 / "
                "with _use_new_zipfile_serialization=False)"
            )
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise ValueError(f"expected one <name>/data.pkl in the archive, found {pkl}")
            self._root = pkl[0].split("/")[0]
            byteorder = f"{self._root}/byteorder"
            if byteorder in names and zf.read(byteorder).strip() != b"little":
                raise ValueError("big-endian checkpoints are not supported")
            obj = _RestrictedUnpickler(zf.open(pkl[0])).load()
            self._infos = {i.filename: i for i in zf.infolist()}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # Lightning-style wrapper
        self.tensors = _flatten_tensors(obj)
        self._data_offsets: dict[str, int] = {}

    def _data_offset(self, key: str) -> int:
        """Byte offset of a storage's data in the file (members are stored uncompressed)."""
        if key not in self._data_offsets:
            info = self._infos.get(f"{self._root}/data/{key}")
            if info is None:
                raise ValueError(f"storage {key} is missing from the archive (truncated file?)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"storage {key} is compressed; torch never writes that")
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._data_offsets[key] = info.header_offset + 30 + name_len + extra_len
        return self._data_offsets[key]

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a fresh numpy array (bf16 via ml_dtypes)."""
        ref = self.tensors[key]
        dtype = ref.storage.dtype
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        dtype = np.dtype(dtype)
        count = ref.storage.numel
        if count == 0 or not all(ref.shape):
            return np.zeros(ref.shape, dtype)
        offset = self._data_offset(ref.storage.key)
        span = sum((s - 1) * st for s, st in zip(ref.shape, ref.stride, strict=True))
        need = ref.offset + 1 + span
        if need > count:
            raise ValueError(f"tensor {key} reaches past its storage")
        storage = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=(count,))
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * dtype.itemsize for s in ref.stride),
        )
        return np.array(view)  # one copy, off the memory map
