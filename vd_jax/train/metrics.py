"""Training metrics to `metrics.jsonl` and TensorBoard event files (written by tensorboardX).

`metrics.jsonl` holds one row of scalars per logged step (what tests, the demo and scripts
read); the event files under `tensorboard/` carry the same scalars plus sample grids, sample
captions and the run's hyperparameters for TensorBoard. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np


def read_events(path: str) -> list:
    """The `Event` protos of one event file, in order (for tests and tools)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i < len(buf):  # TFRecord framing: length, its CRC, data, its CRC
        (n,) = struct.unpack("<Q", buf[i : i + 8])
        out.append(Event.FromString(buf[i + 12 : i + 12 + n]))
        i += 16 + n
    return out


class MetricsWriter:
    """Appends scalars to `workdir/metrics.jsonl` and TensorBoard events to `workdir/tensorboard/`.

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
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.jsonl_path):
            rows = self.read_jsonl(self.jsonl_path)
            with open(self.jsonl_path, "w") as f:
                for r in rows:
                    if r.get("step", 0) <= resume_step:
                        f.write(json.dumps(r) + "\n")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
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
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """One [H, W, 3] image (uint8, or float in [0, 1]) on the Images dashboard."""
        if not self.enabled:
            return
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        self._tb.add_image(tag, arr, int(step), dataformats="HWC")

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Markdown text on the Text dashboard (e.g. sampled captions)."""
        if self.enabled:
            self._tb.add_text(tag, text, int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's flattened config on the HParams dashboard, in this run's event file."""
        if not self.enabled:
            return
        from tensorboardX.summary import hparams as hparams_summary

        clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                 for k, v in hparams.items()}  # fmt: skip
        for summary in hparams_summary(clean, {"loss": 0.0}):
            self._tb.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def write_loss_curve(jsonl_path: str, png_path: str, key: str = "loss") -> bool:
    """Draws `key` and every `key/<flow>` against `step` from metrics.jsonl into a PNG."""
    from PIL import Image, ImageDraw

    if not os.path.exists(jsonl_path):
        return False
    rows = [r for r in MetricsWriter.read_jsonl(jsonl_path) if key in r]
    if len(rows) < 2:
        return False
    keys = [key] + sorted({k for r in rows for k in r if k.startswith(key + "/")})
    steps = np.asarray([r["step"] for r in rows], np.float64)
    series = {k: np.asarray([r.get(k, np.nan) for r in rows], np.float64) for k in keys}
    w, h, pad = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo = float(min(np.nanmin(v) for v in series.values()))
    hi = float(max(np.nanmax(v) for v in series.values()))
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = float(steps.min()), float(steps.max())
    xs = pad + (steps - s0) / max(s1 - s0, 1e-9) * (w - 2 * pad)
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    colors = ["black", "blue", "red", "green", "orange", "purple", "brown", "gray"]
    for i, k in enumerate(keys):
        ys = h - pad - (series[k] - lo) / (hi - lo) * (h - 2 * pad)
        pts = [(x, y) for x, y in zip(xs.tolist(), ys.tolist(), strict=True) if np.isfinite(y)]
        color = colors[i % len(colors)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2 if k == key else 1)
        d.text((w - pad - 150, pad + 5 + 12 * i), k, fill=color)  # the legend
    d.text((pad, 10), f"{key} vs step", fill="black")
    d.text((5, pad - 5), f"{hi:.4g}", fill="black")
    d.text((5, h - pad - 5), f"{lo:.4g}", fill="black")
    d.text((pad, h - pad + 10), f"{int(s0)}", fill="black")
    d.text((w - pad - 30, h - pad + 10), f"{int(s1)}", fill="black")
    img.save(png_path)
    return True
