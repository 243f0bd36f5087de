"""Loaders for the real image pairs in `shared/data/real` (DECam from SFFT's decorrelation test, JWST NIRCam A2744).

Each loader returns a ready `(template, science, sources)` triple of `jd.Exposure`s on one pixel grid plus the
kernel `jd.Sources` (None: let the task detect them). Both data sets were resampled by SWarp, so neighbouring
pixels carry correlated noise: a per-pixel variance built from the error budget describes the noise of single
pixels, while sums over many pixels (and hence a decorrelated difference) scatter somewhat less than it predicts.
"""

import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from ._exposure import Exposure
from ._mask import MASK_PLANES
from ._psf import GaussianPsf, ImagePsf
from ._sources import Sources

_SAT = 1 << MASK_PLANES["SAT"]
_BAD = 1 << MASK_PLANES["BAD"]
_NO_DATA = 1 << MASK_PLANES["NO_DATA"]

_JWST_REF = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
_JWST_SCI = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"


def _native(data) -> np.ndarray:
    """FITS arrays are big-endian; return a native-order float64 copy."""
    arr = np.asarray(data)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False).astype(np.float64)


def _clipped_sigma(values: np.ndarray, n_iter: int = 5, clip: float = 3.0) -> float:
    """Iterated 3σ-clipped standard deviation from the MAD (robust background σ)."""
    v = values[np.isfinite(values)]
    for _ in range(n_iter):
        med = np.median(v)
        sig = 1.4826 * np.median(np.abs(v - med))
        v = v[np.abs(v - med) < clip * sig]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def decam_exposure(path: str | os.PathLike, noise: str = "measured") -> Exposure:
    """One sky-subtracted, resampled DECam InstCal cut-out as an `Exposure`.

    Arguments:
        path: a `DEC-OBS*.mini.fits` input or a `Stack-DEC-OBS*.fits` reference stack.
        noise: "measured" – variance = σ_bg² + max(image, 0)/GAIN, with σ_bg the clipped background σ of the
            (resampled) pixels; "header" – variance = (image + SKYDIP)/GAIN + RDNOISE²/GAIN², the raw
            per-exposure Poisson budget (too large by the SWarp smoothing for single pixels, wrong for stacks).

    Returns:
        An `Exposure` (float64 ADU) with SAT set at ≥ ESATUR (or SATURATE), NO_DATA where non-finite (no weight map
        ships with the data), and a Gaussian PSF from the header FWHM (pixels).
    """
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        img = _native(hdul[0].data)
    gain = float(hdr["GAIN"])
    sat_level = float(hdr.get("ESATUR", hdr["SATURATE"]))
    no_data = ~np.isfinite(img)
    if noise == "measured":
        sky_var = _clipped_sigma(img[~no_data]) ** 2
        var = sky_var + np.maximum(img, 0.0) / gain
    elif noise == "header":
        rd = float(hdr["RDNOISE"])
        var = np.maximum(img + float(hdr.get("SKYDIP", 0.0)), 0.0) / gain + (rd / gain) ** 2
    else:
        raise ValueError(f"noise must be 'measured' or 'header', got {noise!r}")
    mask = np.where(no_data, _NO_DATA, 0) | np.where(np.isfinite(img) & (img >= sat_level), _SAT, 0)
    img = np.where(no_data, 0.0, img)
    var = np.where(no_data, 0.0, var)
    sigma = float(hdr["FWHM"]) / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    size = 2 * int(np.ceil(4.0 * sigma)) + 1
    return Exposure(img, var, mask.astype(np.int32), psf=GaussianPsf(sigma, size))


def load_decam(
    root: str | os.PathLike, science: str = "DEC-OBS04a", template: str = "DEC-OBS18a", stacks: bool = False
) -> tuple[Exposure, Exposure, None]:
    """The DECam i-band pair: 2016 reference (better seeing, the template) and 2018 science.

    Arguments:
        root: the `sfft_decam_decorr` directory.
        science: science exposure name in `input/` (ignored with `stacks`).
        template: template exposure name in `input/` (ignored with `stacks`).
        stacks: use sfft's median stacks `reference_outputs/Stack-DEC-OBS{18,04}.fits` instead.

    Returns:
        (template, science, None): sources are left to the task's detector.
    """
    root = Path(root)
    if stacks:
        t_path = root / "reference_outputs" / "Stack-DEC-OBS18.fits"
        s_path = root / "reference_outputs" / "Stack-DEC-OBS04.fits"
    else:
        t_path = root / "input" / f"{template}.mini.fits"
        s_path = root / "input" / f"{science}.mini.fits"
    return decam_exposure(t_path), decam_exposure(s_path), None


def _webbpsf(path: Path, size: int) -> ImagePsf:
    with fits.open(path) as hdul:
        arr = _native(hdul[0].data)
    cy, cx = np.unravel_index(np.argmax(arr), arr.shape)
    h = size // 2
    cut = arr[cy - h : cy + h + 1, cx - h : cx + h + 1]
    return ImagePsf(cut / cut.sum())


def jwst_exposure(image_path, err_path, psf_path, psf_size: int = 31, box=None) -> Exposure:
    """One NIRCam i2d stamp in MJy/sr with variance ERR² and a cropped WebbPSF model.

    Arguments:
        image_path: the `input/*_i2d_stamp.fits` image.
        err_path: its `auxiliary/*.noise.fits` 1σ map.
        psf_path: its `auxiliary/*.WebbPSF.fits` model (cropped to `psf_size` around the peak, unit sum).
        psf_size: odd PSF stamp size in pixels.
        box: optional (x0, y0, nx, ny) cut-out; `xy0` is set to (x0, y0).

    Returns:
        An `Exposure`; pixels with a non-finite value or ERR ≤ 0 / non-finite are NO_DATA|BAD (image and
        variance zeroed there).
    """
    with fits.open(image_path) as hdul:
        img = _native(hdul[0].data)
    with fits.open(err_path) as hdul:
        err = _native(hdul[0].data)
    x0, y0 = 0, 0
    if box is not None:
        x0, y0, nx, ny = box
        img, err = img[y0 : y0 + ny, x0 : x0 + nx], err[y0 : y0 + ny, x0 : x0 + nx]
    bad = ~np.isfinite(img) | ~np.isfinite(err) | (err <= 0)
    mask = np.where(bad, _NO_DATA | _BAD, 0).astype(np.int32)
    img = np.where(bad, 0.0, img)
    var = np.where(bad, 0.0, err**2)
    return Exposure(img, var, mask, psf=_webbpsf(Path(psf_path), psf_size), xy0=(x0, y0))


def load_jwst(
    root: str | os.PathLike, box=None, psf_size: int = 31, fit_mask_sources: bool = True
) -> tuple[Exposure, Exposure, Sources | None]:
    """The NIRCam F200W A2744 pair: GLASS (June 2022, template) and UNCOVER (Nov 2022, science).

    Both images are in MJy/sr, a surface brightness: with no change in the sky the kernel sum is ≈ 1.

    Arguments:
        root: the `sfft_jwst_nircam_a2744` directory.
        box: optional (x0, y0, nx, ny) cut-out of both images.
        psf_size: odd size of the cropped WebbPSF models.
        fit_mask_sources: take kernel stars as local maxima inside sfft's fitting mask (the mask marks the
            pixels sfft solved on); False returns None (the task detects stars).

    Returns:
        (template, science, sources).
    """
    root = Path(root)
    aux = root / "auxiliary"
    exps = [
        jwst_exposure(
            root / "input" / f"{name}.fits", aux / f"{name}.noise.fits", aux / f"{name}.WebbPSF.fits", psf_size, box
        )
        for name in (_JWST_REF, _JWST_SCI)
    ]
    template, science = exps
    sources = None
    if fit_mask_sources:
        with fits.open(aux / f"{_JWST_SCI}.mask4sfft.fits") as hdul:
            fit = _native(hdul[0].data) > 0.5
        x0, y0 = 0, 0
        if box is not None:
            x0, y0, nx, ny = box
            fit = fit[y0 : y0 + ny, x0 : x0 + nx]
        sources = _mask_peaks(np.asarray(science.image), np.asarray(science.variance), fit, x0, y0)
    return template, science, sources


def _mask_peaks(img, var, fit, x0, y0, snr_min: float = 20.0, half: int = 5) -> Sources:
    """Isolated local maxima (S/N ≥ `snr_min`) inside the fitting mask, brightest first, in parent coordinates."""
    ny, nx = img.shape
    snr = np.where(fit & (var > 0), img / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    pad = np.pad(img, half, constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(pad, (2 * half + 1, 2 * half + 1))
    peak = (img >= windows.max(axis=(-1, -2))) & (snr >= snr_min)
    peak[:half] = peak[-half:] = False
    peak[:, :half] = peak[:, -half:] = False
    rows, cols = np.nonzero(peak)
    order = np.argsort(-img[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    return Sources(cols.astype(np.float64) + x0, rows.astype(np.float64) + y0, img[rows, cols])
