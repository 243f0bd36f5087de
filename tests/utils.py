"""Shared test helpers."""

import os
from pathlib import Path

import numpy as np

# The local mirror of the public real pairs (jaxdiff.datasets' layout): ../shared/data/real beside the clone, or the
# folder in $JAXDIFF_DATA_MIRROR (e.g. when the tests run from a copy outside the checkout). Tests never download.
_MIRROR = os.environ.get("JAXDIFF_DATA_MIRROR", "")
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL_DATA = Path(_MIRROR) if _MIRROR and "://" not in _MIRROR else _BESIDE


def assert_allclose(actual, desired, rtol=None, atol=0.0, err_msg=""):
    """dtype-aware allclose: default rtol 1e-5 for float32 data, 1e-10 for float64."""
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    if rtol is None:
        rtol = 1e-5 if np.float32 in (actual.dtype, desired.dtype) else 1e-10
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)
