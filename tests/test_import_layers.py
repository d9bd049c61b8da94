"""The house's layers (pyproject.toml's import-linter contracts) hold, and break when broken."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is a test extra")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_contracts_kept():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("vd_jax/models/unet.py", "from vd_jax.convert import core", "Layers"),
        ("vd_jax/diffusion/ddim.py", "from vd_jax.models import unet", "Layers"),
        ("vd_jax/train/step.py", "from vd_jax.demo import encoders", "Layers"),
        ("vd_jax/data/caching.py", "from vd_jax.train import loop", "Layers"),
        ("vd_jax/pipelines/vd_pipeline.py", "import torch", "PyTorch and diffusers"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "vd_jax", tmp_path / "vd_jax", ignore=shutil.ignore_patterns("assets"))
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    broken = [ln for ln in out.stdout.splitlines() if ln.strip().endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), out.stdout


def test_importing_the_library_loads_no_torch():
    """torch only inside convert, and lazily there: every module imports without it."""
    code = (
        "import importlib, pkgutil, sys, vd_jax\n"
        "for m in pkgutil.walk_packages(vd_jax.__path__, 'vd_jax.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in ('torch', 'diffusers') if n in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
