"""Assertions shared by the parity tests."""

import numpy as np


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the one error measure of every parity test."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def assert_rel_close(actual, expected, tol: float = 1e-4, what: str = ""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def _shared_dir():
    from pathlib import Path

    # CI clones the repo with shared/ beside it; sessions have it at /work/shared.
    for root in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        if root.is_dir():
            return root
    raise FileNotFoundError("shared/ (the project's fixtures) is not beside the repository")


SHARED = _shared_dir()
FIXTURES = SHARED / "fixtures" / "original_vd"  # key manifests of the released checkpoints
