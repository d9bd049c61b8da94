"""Training metrics to `metrics.jsonl` and TensorBoard event files (written by tensorboardX).

`metrics.jsonl` holds one row of scalars per logged step (what tests, the demo and scripts
read); the event files under `tensorboard/` carry the same scalars plus sample grids, sample
captions and the run's hyperparameters for TensorBoard. Only process 0 writes. The workdir may
be local or an `etils.epath` URL (``gs://...``): object stores cannot append, so there the
jsonl file is rewritten whole at most every `flush_secs` and on `flush` / `close`.
"""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath


def read_events(path: str) -> list:
    """The `Event` protos of one event file, in order (for tests and tools)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    buf = epath.Path(path).read_bytes()
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

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        resume_step: int | None = None,
        flush_secs: float = 30.0,
    ):
        self.enabled = enabled
        root = epath.Path(workdir)
        self.jsonl_path = root / "metrics.jsonl"
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        root.mkdir(parents=True, exist_ok=True)
        self._local = "://" not in str(workdir)
        self._rows: list[str] = []
        if self.jsonl_path.exists():
            rows = self.read_jsonl(self.jsonl_path)
            keep = [r for r in rows if resume_step is None or r.get("step", 0) <= resume_step]
            self._rows = [json.dumps(r) + "\n" for r in keep]
            if len(keep) < len(rows):
                self.jsonl_path.write_text("".join(self._rows))
        self._flush_secs, self._flushed = flush_secs, time.monotonic()
        # tensorboardX writes gs:// and s3:// itself (google-cloud-storage / boto).
        self._tb = SummaryWriter(str(root / "tensorboard"), flush_secs=int(flush_secs))
        self._jsonl = self.jsonl_path.open("a") if self._local else None

    @staticmethod
    def read_jsonl(path) -> list[dict[str, Any]]:
        text = epath.Path(path).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_scalars(self, step: int, scalars: Mapping[str, Any], jsonl: bool = True) -> None:
        """One row per train step in metrics.jsonl (`jsonl=False`: TensorBoard only)."""
        if not self.enabled:
            return
        if jsonl:
            row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
            self._rows.append(json.dumps(row) + "\n")
            if self._jsonl is not None:
                self._jsonl.write(self._rows[-1])
                self._jsonl.flush()
            elif time.monotonic() - self._flushed > self._flush_secs:
                self._write_rows()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def _write_rows(self) -> None:
        """The whole jsonl file at once (an object store's only way to grow a file)."""
        self.jsonl_path.write_text("".join(self._rows))
        self._flushed = time.monotonic()

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
            if self._jsonl is None:
                self._write_rows()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            if self._jsonl is None:
                self._write_rows()
            else:
                self._jsonl.close()


def write_png(path, image) -> None:
    """A PIL image as a PNG at a local path or URL, whole or not at all."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # overwrites (a resumed run redraws its curve)


def write_loss_curve(jsonl_path, png_path, key: str = "loss") -> bool:
    """Draws `key` and every `key/<flow>` against `step` from metrics.jsonl into a PNG."""
    from PIL import Image, ImageDraw

    if not epath.Path(jsonl_path).exists():
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
    write_png(png_path, img)
    return True
