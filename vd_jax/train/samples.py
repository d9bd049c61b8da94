"""Sampling during training: one DDIM-with-guidance sampler per flow, and the sample grids.

`make_flow_sampler` is the jittable sampler the trainer's periodic grids and the demo's
evaluation share; `Sampler` runs it for every trained flow from fixed inputs and writes PNG
grids (image flows) or sentences (text flows) under `workdir/samples`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vd_jax import flows as vd_flows
from vd_jax import xla_options
from vd_jax.models import unet
from vd_jax.train.metrics import MetricsWriter, write_png
from vd_jax.train.objective import noise_schedule

if TYPE_CHECKING:
    from vd_jax.train.loop import Trainer


def make_flow_sampler(
    model: unet.VDDiffuser,
    vae,
    flow: str,
    *,
    num: int,
    latent_size: int,
    steps: int,
    guidance_scale: float,
    dual_ratio: float = 0.5,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    schedule: Any = None,
):
    """`run(params, frozen, inputs, rng)`: DDIM with classifier-free guidance for one flow.

    `inputs` holds `{ctype}_context` [num, L, D] for each of the flow's context types,
    `frozen` the unconditional contexts (`uncond_text`, `uncond_image`) and, for image
    flows, the VAE params (`vae`). Image flows return decoded images in [0, 1], text flows
    the sampled text latents. Conditional and unconditional halves run as one batch.
    """
    from vd_jax.diffusion import ddim
    from vd_jax.diffusion.schedules import NoiseSchedule
    from vd_jax.models.vae import decode_latents

    xtype, ctypes = vd_flows.get(flow).data, vd_flows.get(flow).contexts
    schedule = schedule or NoiseSchedule(prediction_type=prediction_type)
    tables = ddim.ddim_tables(schedule, steps)
    dcfg = model.config
    ratios = None if len(ctypes) == 1 else (dual_ratio, 1.0 - dual_ratio)
    if xtype == "image":
        shape = (num, latent_size, latent_size, dcfg.image_in_channels)
    else:
        shape = (num, dcfg.text_dim)

    def run(params, frozen, inputs, rng):
        k_init, k_eta = jax.random.split(rng)
        x = jax.random.normal(k_init, shape, jnp.float32)
        ctx = []
        for c in ctypes:
            cond = inputs[f"{c}_context"]
            unc = jnp.broadcast_to(frozen[f"uncond_{c}"].astype(cond.dtype), cond.shape)
            ctx.append(jnp.concatenate([unc, cond]))

        def model_fn(xt, t):
            eps = model.apply(
                {"params": params},
                jnp.concatenate([xt, xt]),
                jnp.concatenate([t, t]),
                ctx,
                xtype=xtype,
                ctypes=ctypes,
                ratios=ratios,
            ).astype(jnp.float32)
            e_u, e_c = jnp.split(eps, 2)
            return ddim.classifier_free_guidance(e_u, e_c, guidance_scale)

        x0 = ddim.sample_loop(model_fn, x, tables, schedule, eta=eta, rng=k_eta)
        if xtype == "image":
            return decode_latents(vae, frozen["vae"], x0)
        return x0

    return run


class Sampler:
    """DDIM samples of every trained flow from fixed inputs (the data's first examples).

    Image flows are decoded by the frozen VAE and saved as PNG grids
    (`workdir/samples/{flow}_{step}.png`, and on TensorBoard's Images tab); text flows log
    latent statistics and, when the text VAE can decode, the sentences (`.txt`).
    """

    def __init__(self, trainer: Trainer, workdir: str, writer: MetricsWriter, first_batch: dict):
        """`first_batch`: the same on every host (host 0's view of the stream's first batch)."""
        self.trainer, self.writer, self.config = trainer, writer, trainer.config
        self.dir = epath.Path(workdir) / "samples"
        n = self.config.num_samples
        host = {k: v[:n] for k, v in first_batch.items()}
        self.captions = [str(c) for c in host.get("caption", [])]
        local = trainer.encoders.host_prepare(host, trainer.needed)
        rep = trainer.rep
        batch = {
            k: jax.make_array_from_callback(v.shape, rep, lambda idx, v=v: v[idx])
            for k, v in local.items()
        }
        encode = xla_options.jit(
            lambda f, b: trainer.encoders.encode(f, b, jax.random.key(0), trainer.needed)[0],
            out_shardings=rep,
        )
        self.inputs = encode(trainer.frozen, batch)
        self._fns: dict[str, Any] = {}

    def _fn(self, flow: str):
        tr, cfg = self.trainer, self.config
        return xla_options.jit(
            make_flow_sampler(
                tr.model, tr.encoders.vae, flow, num=cfg.num_samples, latent_size=cfg.latent_size,
                steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                dual_ratio=cfg.dual_ratio, schedule=noise_schedule(cfg),
            ),
            out_shardings=tr.rep,
        )  # fmt: skip

    def __call__(self, state: dict, step: int) -> None:
        params = state["ema_params"] or state["params"]
        rng = jax.random.key(self.config.seed + 17)
        for flow in self.trainer.flows:
            if flow not in self._fns:
                self._fns[flow] = self._fn(flow)
            out = np.asarray(jax.device_get(self._fns[flow](params, self.trainer.frozen,
                                                             self.inputs, rng)))  # fmt: skip
            if not self.writer.enabled:
                continue
            self.dir.mkdir(parents=True, exist_ok=True)
            base = f"{flow}_{step:07d}"
            if vd_flows.get(flow).data == "image":
                grid = image_grid(out)
                from PIL import Image

                write_png(self.dir / f"{base}.png", Image.fromarray(grid))
                self.writer.write_image(step, f"samples/{flow}", grid)
            else:
                self.writer.write_scalars(
                    step,
                    {f"samples/{flow}/mean": out.mean(), f"samples/{flow}/std": out.std()},
                    jsonl=False,
                )
                # Hook: real sentences once the Optimus text VAE is wired as `text_vae`.
                text_vae = self.trainer.encoders.text_vae
                lines = text_vae.decode(out) if hasattr(text_vae, "decode") else []
                pairs = [
                    f"{src}\t->\t{line}" for src, line in zip(self.captions, lines, strict=False)
                ]
                (self.dir / f"{base}.txt").write_text("".join(p + "\n" for p in pairs))
                if pairs:
                    self.writer.write_text(step, f"samples/{flow}", "\n\n".join(pairs))


def image_grid(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> one uint8 grid, ceil(sqrt(N)) columns, 2 px gaps."""
    n, h, w, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = 2 + r * (h + 2), 2 + c * (w + 2)
        grid[y : y + h, x : x + w] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return grid
