"""Assertions shared by the parity tests."""

from pathlib import Path

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


# Key/shape manifests of the released checkpoints (tiny and full size), kept in the repository.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original_vd"
