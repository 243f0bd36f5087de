"""Find kernel candidate stars on an image when no source list is given (ALGORITHM §6.1)."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._sources import Sources, capacity_for
from ._stats import median_background, usable
from .convolve import convolve

_BACKGROUND_BIN = 128
_BACKGROUND_SAMPLES = 2**18  # pixels the background medians read at most (a regular grid beyond that)


def background_stride(shape) -> int:
    """Static stride of the detection background's samples: the power of two (≤ 8, so that a bin keeps at least
    16² samples) that keeps about `_BACKGROUND_SAMPLES` pixels. The median of 32² samples scatters by about
    1.25 σ/32 ≈ 4 % of the pixel noise, far below the S/N ≥ 10 of kernel candidates, and the sort it needs is a
    sixteenth of the full bin's at 2048²."""
    ratio = shape[0] * shape[1] / _BACKGROUND_SAMPLES
    return 1 if ratio <= 1 else min(8, 1 << math.ceil(math.log2(math.sqrt(ratio))))


def _snr_map(image, variance, mask_bad, psf_image):
    """PSF matched-filter S/N (P̃ ∗ I)/√(P̃² ∗ V) after a 128-px-cell median background."""
    good = usable(image, variance) & ~mask_bad
    bg = median_background(image, good, _BACKGROUND_BIN, stride=background_stride(image.shape))
    img = jnp.where(good, image - bg, 0.0)
    var = jnp.where(good, variance, 0.0)
    # correlation with P = convolution with P rotated by 180° (overlap-save tiles, zero beyond the array)
    pr = psf_image[::-1, ::-1].astype(img.dtype)
    num = convolve(img, pr)
    den = convolve(var, pr**2)
    snr = num / jnp.sqrt(jnp.where(den > 0, den, jnp.inf))
    flux = num / jnp.sum(psf_image**2)
    return jnp.where(good, snr, 0.0), flux


def _peaks(snr):
    local_max = lax.reduce_window(snr, -jnp.inf, lax.max, (3, 3), (1, 1), "SAME")
    return snr >= local_max


@eqx.filter_jit
def _detection_maps(exposure, bad_bits: int):
    """(S/N, flux, local-maximum flag) maps in one compiled program (the PSF image is drawn inside it)."""
    bad = (exposure.mask & bad_bits) != 0
    snr, flux = _snr_map(exposure.image, exposure.variance, bad, exposure.psf.image())
    return snr, flux, _peaks(snr)


def detect_sources(exposure, bad_bits: int, snr_range=(10.0, 500.0), max_sources: int = -1) -> Sources:
    """Isolated point-like peaks with snr_range[0] < S/N < snr_range[1], brightest first.

    Arguments:
        exposure: the image to search (usually the science exposure); needs a PSF.
        bad_bits: mask bits whose pixels are ignored.
        snr_range: accepted matched-filter S/N range (LSST's detection thresholds for kernel sources).
        max_sources: keep at most this many (−1: all).

    Returns:
        `Sources` in parent coordinates with the matched-filter flux, padded (valid=False) to a multiple of
        `SOURCE_CAPACITY` so that the count is no shape; no valid entry when nothing is found.
    """
    if exposure.psf is None:
        raise ValueError(
            "sources=None needs a science PSF to find kernel stars; pass a source list or a PSF "
            "(jd.estimate_psf measures one on the image; jd.exposure_from_arrays does it for plain arrays)"
        )
    maps = _detection_maps(dataclasses.replace(exposure, wcs=None), bad_bits)
    snr, flux, peaks = (np.asarray(a) for a in jax.device_get(maps))
    sel = peaks & (snr > snr_range[0]) & (snr < snr_range[1])
    rows, cols = np.nonzero(sel)
    order = np.argsort(-snr[rows, cols], kind="stable")
    if max_sources >= 0:
        order = order[:max_sources]
    rows, cols = rows[order], cols[order]
    x0, y0 = (int(v) for v in np.asarray(exposure.xy0))
    found = Sources(cols.astype(np.float64) + x0, rows.astype(np.float64) + y0, flux[rows, cols].astype(np.float64))
    return found.padded(capacity_for(len(rows)))
