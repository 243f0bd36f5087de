"""Subtraction quality figures for the task metadata, and the opt-in bad-subtraction error.

ip_diffim records template coverage, variance factors and PSF sizes in `AlardLuptonSubtractTask`'s metadata,
limiting magnitudes (`_calculateMagLim`) and, in `DetectAndMeasureTask.calculateMetrics`, the ratio of the
difference to the science image in source footprints, raising `BadSubtractionError` above a threshold when
`raiseOnBadSubtractionRatio` is set. The footprint ratio and per-source residual statistics are computed here
on host (numpy, after one `jax.device_get`), once per task call.
"""

from typing import NamedTuple

import jax
import numpy as np

from ._config import SubtractConfig
from ._errors import BadSubtractionError
from ._exposure import Exposure
from ._mask import bitmask
from ._psf import FWHM_PER_SIGMA, Psf, host_sigma_xy
from ._runtime import helper_pool
from ._sources import Sources
from ._stats import grid_stride

_AB_NJY = 31.4  # AB magnitude of 1 nJy
_NSIGMA = 5.0  # limiting magnitudes are for 5σ point sources, as ip_diffim's
_MAGLIM_SAMPLES = 2**16  # pixels whose median variance sets a limiting magnitude
_BOXES = "science_boxes"  # the key of the science cut-outs among the started figures
_EXCLUDED = ("NO_DATA", "BAD", "SAT", "SAT_TEMPLATE", "EDGE", "CR", "INTRP")  # pixels kept out of the figures


def psf_widths(psf: Psf | None):
    """(σx, σy) in pixels as Python floats (adaptive moments), or None without a PSF or when they fail."""
    if psf is None:
        return None
    w = host_sigma_xy(psf)
    return (float(w[0]), float(w[1])) if np.all(np.isfinite(w)) else None


def psf_fwhm(widths) -> float | None:
    """FWHM (pixels) of the Gaussian-equivalent width √((σx² + σy²)/2) of widths (σx, σy), or None without them."""
    return None if widths is None else FWHM_PER_SIGMA * float(np.sqrt(0.5 * (widths[0] ** 2 + widths[1] ** 2)))


def limiting_magnitude(variance: np.ndarray, good: np.ndarray, sigma_xy, photo_calib: float) -> float | None:
    """AB magnitude of a 5σ point source: zp − 2.5 log10(5 √(A · median V)), A = 4π σx σy the PSF's noise-
    equivalent area and zp = 31.4 − 2.5 log10(photo_calib) (photo_calib in nJy per count; ip_diffim's
    `_calculateMagLim`). None without a PSF, a positive finite calibration, or good pixels."""
    if sigma_xy is None or not (np.isfinite(photo_calib) and photo_calib > 0) or not np.any(good):
        return None
    area = 4 * np.pi * sigma_xy[0] * sigma_xy[1]
    noise = np.sqrt(area * float(np.median(variance[good], overwrite_input=True)))  # a copy: partition it in place
    if not (np.isfinite(noise) and noise > 0):
        return None
    return float(_AB_NJY - 2.5 * np.log10(photo_calib) - 2.5 * np.log10(_NSIGMA * noise))


def _boxes(planes, cx: np.ndarray, cy: np.ndarray, r: int, fills) -> list[np.ndarray]:
    """(n, 2r + 1, 2r + 1) cut-outs of each (ny, nx) plane centred on integer (cx, cy), its fill beyond the
    array: only the cut-outs are read (no padded copy of a plane). Boxes inside the array are copied as whole
    windows (a strided view indexed by their corners); only boxes that cross the edge are gathered pixel by
    pixel."""
    ny, nx = planes[0].shape
    side = 2 * r + 1
    off = np.arange(-r, r + 1)
    rows, cols = cy[:, None] + off[None, :], cx[:, None] + off[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    whole = ny >= side and nx >= side  # a whole window fits in the array (else every box is gathered)
    edge = ~np.all(inside, axis=(1, 2)) if whole else np.ones(len(cx), bool)
    r0, c0 = np.clip(cy - r, 0, ny - side), np.clip(cx - r, 0, nx - side)
    flat = np.clip(rows[edge], 0, ny - 1)[:, :, None] * nx + np.clip(cols[edge], 0, nx - 1)[:, None, :]
    out = []
    for p, f in zip(planes, fills, strict=True):
        if whole:
            box = np.lib.stride_tricks.sliding_window_view(p, (side, side))[r0, c0]
        else:
            box = np.empty((len(cx), side, side), p.dtype)
        box[edge] = np.where(inside[edge], np.take(p.reshape(-1), flat), np.asarray(f, p.dtype))
        out.append(box)
    return out


def _row_nanmedian(x: np.ndarray) -> np.ndarray:
    """`np.nanmedian(x, axis=1)` of a 2-d array by one sort (NaN sorts last; NaN for a row without a value):
    the same numbers, five times faster on the footprint rings."""
    s = np.sort(x, axis=1)
    n = np.sum(~np.isnan(x), axis=1)
    lo = np.take_along_axis(s, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(s, np.maximum(n // 2, 0)[:, None], axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


class ScienceBoxes(NamedTuple):
    """The science side of the footprint figures: the sources inside the box and cut-outs around them."""

    x: np.ndarray  # parent positions of the sources used
    y: np.ndarray
    cx: np.ndarray  # their nearest pixels, array coordinates
    cy: np.ndarray
    r: int  # footprint radius (pixels)
    big: int  # half side of the cut-outs
    image: np.ndarray  # (n, 2·big + 1, 2·big + 1) science image and variance around the sources (NaN beyond)
    variance: np.ndarray


def science_boxes(science: Exposure, sources: Sources, fwhm: float, half: int) -> ScienceBoxes:
    """The valid sources inside the science box, and the science image and variance cut out around them (see
    `footprint_figures` for the arguments): everything the footprint figures read from the science image."""
    s_img, s_var = (np.asarray(a) for a in jax.device_get((science.image, science.variance)))
    x0, y0 = (int(v) for v in np.asarray(science.xy0))
    valid = np.asarray(sources.valid, bool) if len(sources) else np.zeros(0, bool)
    x = np.asarray(sources.x, np.float64)[valid]
    y = np.asarray(sources.y, np.float64)[valid]
    cx = np.floor(x + 0.5).astype(int) - x0
    cy = np.floor(y + 0.5).astype(int) - y0
    ny, nx = s_img.shape
    inside = (cx >= 0) & (cy >= 0) & (cx < nx) & (cy < ny)
    x, y, cx, cy = x[inside], y[inside], cx[inside], cy[inside]
    # the footprint figures are per source: the planes are only read in (2R + 1)² cut-outs around the sources
    r = max(2, int(round(2 * fwhm)))  # footprints: disks of radius 2·FWHM, sky from a 3-pixel annulus beyond
    big = max(half, r + 3)
    sb, vb = _boxes((s_img, s_var), cx, cy, big, (np.nan, np.nan))
    return ScienceBoxes(x, y, cx, cy, r, big, sb, vb)


def footprint_figures(
    science: Exposure,
    difference: Exposure,
    sources: Sources,
    fwhm: float,
    half: int,
    min_snr: float = 10.0,
    boxes: "ScienceBoxes | None" = None,
) -> dict:
    """Per-source statistics on the difference, and ip_diffim's difference-to-science footprint ratio.

    Arguments:
        science, difference: exposures on the science box (host arrays are read once).
        sources: the kernel candidates (valid entries inside the box are used).
        fwhm: science PSF FWHM (pixels); footprints are disks of radius max(2, 2·FWHM).
        half: half side of the square stamp whose residual statistics are reported (the kernel's half size).
        min_snr: footprints enter the ratio when the source's S/N in them exceeds this.
        boxes: `science_boxes(science, sources, fwhm, half)`, when the caller cut them already (the task does
            while XLA runs: they need no difference).

    Returns:
        A dict: `difference_footprint_ratio_mean` and `_stdev` ((Σ|D − level| − noise floor) / Σ(S − sky) over
        each footprint free of excluded pixels whose source has S/N > `min_snr`; levels are medians of a 3-pixel
        annulus, the noise floor is √(2/π) Σ √V_D, the expected Σ|D| of pure noise, as in ip_diffim's
        `computeDifferenceImageMetrics`; None when no footprint qualifies), `n_footprints`, and
        `stamp_statistics`, a dict of lists (`x`, `y`, `residual_mean`, `residual_std`, `n_pixels`) of
        D/√variance over each source's
        (2·half + 1)² stamp (good pixels only).
    """
    if boxes is None:
        boxes = science_boxes(science, sources, fwhm, half)
    x, y, r, big, sb, vb = boxes.x, boxes.y, boxes.r, boxes.big, boxes.image, boxes.variance
    d_planes = tuple(np.asarray(a) for a in jax.device_get((difference.image, difference.variance, difference.mask)))
    db, dvb, mb = _boxes(d_planes, boxes.cx, boxes.cy, big, (np.nan, np.nan, 0))
    ra = r + 3
    good = (mb & bitmask(difference.mask_planes, _EXCLUDED)) == 0
    ok = np.isfinite(db) & (dvb > 0) & (dvb < np.inf) & np.isfinite(sb) & good

    # residual statistics on each stamp
    c = slice(big - half, big + half + 1)
    okh = ok[:, c, c]
    zb = np.where(okh, db[:, c, c] / np.sqrt(np.where(okh, dvb[:, c, c], 1.0)), np.nan)
    fin = np.isfinite(zb)
    n_pix = np.sum(fin, axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_pix > 0, np.sum(np.where(fin, zb, 0), axis=(1, 2)) / np.maximum(n_pix, 1), np.nan)
        var = np.sum(np.where(fin, (zb - mean[:, None, None]) ** 2, 0), axis=(1, 2)) / np.maximum(n_pix - 1, 1)
    stamps = dict(
        x=x.tolist(),
        y=y.tolist(),
        residual_mean=[None if not np.isfinite(v) else float(v) for v in mean],
        residual_std=[None if n < 2 else float(np.sqrt(v)) for v, n in zip(var, n_pix, strict=True)],
        n_pixels=n_pix.astype(int).tolist(),
    )

    # footprints: the disk's and the ring's pixels, gathered once from each flattened box (row-major order)
    off = np.arange(-ra, ra + 1)
    rr = np.hypot(off[None, :], off[:, None])
    at = (off[:, None] + big) * (2 * big + 1) + (off[None, :] + big)
    disk, ring = at[rr <= r], at[(rr > r) & (rr <= ra)]
    flat = lambda a, idx: np.take(a.reshape(len(a), -1), idx, axis=1)
    ok_ring = flat(ok, ring)
    # a footprint enters only when every disk pixel is good (its sums then read no masked pixel) and 8 ring
    # pixels are
    complete = np.all(flat(ok, disk), axis=1) & (np.sum(ok_ring, axis=1) >= 8)
    with np.errstate(invalid="ignore", divide="ignore"):
        sky_s = _row_nanmedian(np.where(ok_ring, flat(sb, ring), np.nan))
        sky_d = _row_nanmedian(np.where(ok_ring, flat(db, ring), np.nan))
        flux = np.sum(flat(sb, disk) - sky_s[:, None], axis=1)
        snr = flux / np.sqrt(np.sum(flat(vb, disk), axis=1))
        resid = np.sum(np.abs(flat(db, disk) - sky_d[:, None]), axis=1)
        # the noise floor of Σ|D|: E|N(0, V)| = √(2V/π) per pixel, from the difference's variance plane (ip_diffim
        # subtracts the same sum measured on sky footprints)
        floor = np.sqrt(2 / np.pi) * np.sum(np.sqrt(flat(dvb, disk)), axis=1)
    # footprints of the sources kernel stars are drawn from: S/N above the detection threshold
    use = complete & (snr > min_snr)
    ratios = (resid[use] - floor[use]) / flux[use]
    return dict(
        difference_footprint_ratio_mean=float(np.mean(ratios)) if ratios.size else None,
        difference_footprint_ratio_stdev=float(np.std(ratios)) if ratios.size > 1 else None,
        n_footprints=int(ratios.size),
        stamp_statistics=stamps,
    )


def quality_figures(
    template: Exposure,
    science: Exposure,
    difference: Exposure,
    sources: Sources,
    widths,
    kernel_size: int,
    min_snr: float = 10.0,
    started: dict | None = None,
) -> dict:
    """Limiting magnitudes of the science, template and difference, and the footprint figures.

    Arguments:
        template, science: the inputs; difference: the task's difference.
        sources: the kernel candidates.
        widths: {"template": (σx, σy) or None, "science": ..., "difference": ...} PSF widths (pixels); without
            "difference", the difference PSF's widths are measured here.
        kernel_size: side of the matching kernel (residual stamps are that wide).
        min_snr: S/N above which a source's footprint enters the ratio.
        started: the futures of `start_input_figures` (called with the same sources and kernel size), when the
            caller started them already.
    """
    # the difference's figures run in this thread, one after the other: right after XLA they read cold planes, and
    # two threads of them (the footprint figures in halves, or beside the limiting magnitude) were no faster; only
    # the work that needs no difference (the inputs' magnitudes, the science cut-outs) runs on helper threads,
    # started beside the subtraction
    if started is None:
        started = start_input_figures(template, science, widths, helper_pool(), sources, kernel_size)
    started = dict(started)
    boxes = started.pop(_BOXES).result() if _BOXES in started else None
    diff_widths = widths["difference"] if "difference" in widths else psf_widths(difference.psf)
    figures = {key: future.result() for key, future in started.items()}
    figures["difference_limiting_magnitude"] = _exposure_limiting_magnitude(difference, diff_widths)
    fwhm = _footprint_fwhm(widths)
    return figures | footprint_figures(science, difference, sources, fwhm, kernel_size // 2, min_snr, boxes)


def start_input_figures(
    template: Exposure, science: Exposure, widths, pool, sources: Sources | None = None, kernel_size: int = 0
) -> dict:
    """The figures of the inputs alone, submitted to `pool`: {key: future}. The task starts them while the
    subtraction runs: their limiting magnitudes and, given the sources and the kernel size, the science
    cut-outs of the footprint figures."""
    started = {
        f"{name}_limiting_magnitude": pool.submit(_exposure_limiting_magnitude, e, widths[name])
        for name, e in (("science", science), ("template", template))
    }
    if sources is not None:
        started[_BOXES] = pool.submit(science_boxes, science, sources, _footprint_fwhm(widths), kernel_size // 2)
    return started


def _footprint_fwhm(widths) -> float:
    """The science PSF's FWHM that sets the footprints; a σ = 2 px PSF's when the science image has none."""
    return 2.0 * FWHM_PER_SIGMA if widths["science"] is None else psf_fwhm(widths["science"])


def _exposure_limiting_magnitude(e: Exposure, sigma_xy) -> float | None:
    """`limiting_magnitude` with the median variance of a regular grid of at most `_MAGLIM_SAMPLES` pixels
    (every s-th row and column, s = `_stats.grid_stride`): variance planes are smooth. Against the full-image
    median, a 2¹⁶-pixel grid moved the magnitudes of the benchmark pairs (1024²-4096²), the DECam pair and the
    JWST cut-out by at most 0.00023 (2¹⁸ pixels: 0.00013), for a quarter of the reads and the selection."""
    var, mask = (np.asarray(a) for a in jax.device_get((e.variance, e.mask)))
    s = grid_stride(var.shape, _MAGLIM_SAMPLES)
    var, mask = var[::s, ::s], mask[::s, ::s]
    good = np.isfinite(var) & (var > 0) & ((mask & bitmask(e.mask_planes, ("NO_DATA", "BAD", "SAT"))) == 0)
    return limiting_magnitude(var, good, sigma_xy, float(np.asarray(e.photo_calib)))


def check_quality(metadata: dict, config: SubtractConfig) -> None:
    """Raise `BadSubtractionError` when `config.raise_on_bad_subtraction_ratio` and a footprint figure exceeds
    its threshold (ip_diffim's `calculateMetrics`)."""
    if not config.raise_on_bad_subtraction_ratio:
        return
    mean = metadata.get("difference_footprint_ratio_mean")
    if mean is not None and mean > config.bad_subtraction_ratio_threshold:
        raise BadSubtractionError(mean, config.bad_subtraction_ratio_threshold, "mean")
    std = metadata.get("difference_footprint_ratio_stdev")
    if std is not None and std > config.bad_subtraction_variation_threshold:
        raise BadSubtractionError(std, config.bad_subtraction_variation_threshold, "standard deviation of the")
