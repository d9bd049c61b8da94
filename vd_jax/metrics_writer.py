"""Training metrics to `metrics.jsonl` and TensorBoard event files, without TensorFlow.

An event file is a TFRecord stream of `Event` protos; the few fields the scalar and image
dashboards read are encoded here by hand (protobuf wire format + masked CRC32C), so no
TensorFlow, tensorboard or tensorboardX install is needed. Only process 0 writes.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- TFRecord framing


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def read_tfrecords(path: str) -> list[bytes]:
    """The records of a file, CRCs checked (for tests and tools)."""
    out = []
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i < len(buf):
        (n,) = struct.unpack("<Q", buf[i : i + 8])
        if struct.unpack("<I", buf[i + 8 : i + 12])[0] != _masked_crc(buf[i : i + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        data = buf[i + 12 : i + 12 + n]
        if struct.unpack("<I", buf[i + 12 + n : i + 16 + n])[0] != _masked_crc(data):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        out.append(data)
        i += 16 + n
    return out


# --------------------------------------------------------------------------- protobuf wire format


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
    out = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
    if file_version:
        out += _bytes_field(3, file_version.encode())
    if summary:
        out += _bytes_field(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))


def _image_value(tag: str, image: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    img = (
        _field(1, 0, _varint(h))
        + _field(2, 0, _varint(w))
        + _field(3, 0, _varint(c))
        + _bytes_field(4, buf.getvalue())
    )
    return _bytes_field(1, tag.encode()) + _bytes_field(4, img)


# --------------------------------------------------------------------------- writer


class MetricsWriter:
    """Appends scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/events.out.*`.

    Args:
      workdir: the run's directory.
      enabled: False on every process but 0 (then every call is a no-op).
      resume_step: drops jsonl rows with `step > resume_step`, written by a run that died
        after its last checkpoint, so the file reads as one curve after a resume.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.jsonl_path):
            rows = self.read_jsonl(self.jsonl_path)
            with open(self.jsonl_path, "w") as f:
                for r in rows:
                    if r.get("step", 0) <= resume_step:
                        f.write(json.dumps(r) + "\n")
        tb = os.path.join(workdir, "tensorboard")
        os.makedirs(tb, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.event_path = os.path.join(tb, name)
        self._events = open(self.event_path, "ab")
        self._events.write(tfrecord(_event(0, file_version="brain.Event:2")))
        self._jsonl = open(self.jsonl_path, "a")

    @staticmethod
    def read_jsonl(path: str) -> list[dict[str, Any]]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write_scalars(self, step: int, scalars: Mapping[str, Any], jsonl: bool = True) -> None:
        """One row per train step in metrics.jsonl (`jsonl=False`: TensorBoard only)."""
        if not self.enabled:
            return
        if jsonl:
            row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        summary = b"".join(_bytes_field(1, _scalar_value(k, v)) for k, v in scalars.items())
        self._events.write(tfrecord(_event(step, summary=summary)))
        self._events.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """One [H, W, 3] image (uint8, or float in [0, 1]) on the Images dashboard."""
        if not self.enabled:
            return
        summary = _bytes_field(1, _image_value(tag, image))
        self._events.write(tfrecord(_event(step, summary=summary)))
        self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._events.close()
            self._jsonl.close()


def write_loss_curve(jsonl_path: str, png_path: str, key: str = "loss") -> bool:
    """Draws `key` against `step` from metrics.jsonl into a PNG (Pillow only)."""
    from PIL import Image, ImageDraw

    if not os.path.exists(jsonl_path):
        return False
    rows = [r for r in MetricsWriter.read_jsonl(jsonl_path) if key in r]
    if len(rows) < 2:
        return False
    steps = np.asarray([r["step"] for r in rows], np.float64)
    vals = np.asarray([r[key] for r in rows], np.float64)
    w, h, pad = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = float(steps.min()), float(steps.max())
    xs = pad + (steps - s0) / max(s1 - s0, 1e-9) * (w - 2 * pad)
    ys = h - pad - (vals - lo) / (hi - lo) * (h - 2 * pad)
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill="blue", width=2)
    d.text((pad, 10), f"{key} vs step", fill="black")
    d.text((5, pad - 5), f"{hi:.4g}", fill="black")
    d.text((5, h - pad - 5), f"{lo:.4g}", fill="black")
    d.text((pad, h - pad + 10), f"{int(s0)}", fill="black")
    d.text((w - pad - 30, h - pad + 10), f"{int(s1)}", fill="black")
    img.save(png_path)
    return True
