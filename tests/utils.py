"""Shared test helpers."""

from pathlib import Path

import numpy as np

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def assert_allclose(actual, desired, rtol=None, atol=0.0, err_msg=""):
    """dtype-aware allclose: default rtol 1e-5 for float32 data, 1e-10 for float64."""
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    if rtol is None:
        rtol = 1e-5 if np.float32 in (actual.dtype, desired.dtype) else 1e-10
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)
