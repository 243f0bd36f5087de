"""Plain images in: an `Exposure` from bare arrays (gain, read noise, saturation, valid range, mask image, PSF)
and a PSF estimated from the image's stars when none is given.

These are eager, NumPy-side preparations of inputs (they run once per file, before any tracing).
"""

import math
import os

import numpy as np

from ._exposure import Exposure
from ._io import _estimate_variance
from ._mask import MASK_PLANES, as_plane_table, bitmask, plane_bit
from ._psf import FWHM_PER_SIGMA, GaussianPsf, ImagePsf, Psf, adaptive_moments

# PSF estimation (`estimate_psf`)
_FIND_SIGMA = 1.5  # smoothing width (px) of the star finder: any PSF of FWHM 2–8 px peaks in it
_MIN_SNR = 30.0  # candidate stars: smoothed peak S/N above this
_STAMP_HALF = 12  # stamps of 25 × 25 px
_MAX_STARS = 100
_MIN_STARS_IMAGE = 5  # at least this many good stars → an `ImagePsf` from their stack; fewer → a Gaussian
_MIN_STARS_GAUSSIAN = 2


def psf_from_option(value, name: str = "PSF") -> Psf:
    """A PSF from a FWHM in pixels (a number or a numeric string) or from the path of a FITS PSF image."""
    if isinstance(value, Psf):
        return value
    try:
        fwhm = float(value)
    except (TypeError, ValueError):
        fwhm = None
    if fwhm is not None:
        if not (math.isfinite(fwhm) and fwhm > 0):
            raise ValueError(f"{name}: a PSF FWHM must be a positive number of pixels, got {value!r}")
        sigma = fwhm / FWHM_PER_SIGMA
        return GaussianPsf(sigma, 2 * math.ceil(4 * sigma) + 1)
    if isinstance(value, np.ndarray):
        return _psf_from_array(value, name)
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {value!r} is neither a FWHM in pixels nor an existing PSF FITS file")
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = hdul["PSF"] if "PSF" in hdul else next((h for h in hdul if h.data is not None), None)
            if hdu is None:
                raise ValueError(f"{name}: the PSF file {path} holds no image")
            data = np.asarray(hdu.data, np.float64)
    except OSError as err:
        raise ValueError(f"{name}: cannot read the PSF file {path}: {err}") from err
    return _psf_from_array(data, f"{name} ({path})")


def _psf_from_array(data, name: str) -> ImagePsf:
    data = np.squeeze(np.asarray(data, np.float64))
    if data.ndim != 2 or data.shape[0] != data.shape[1] or data.shape[0] % 2 == 0:
        raise ValueError(f"{name}: a PSF image must be square with an odd side, got shape {data.shape}")
    total = float(np.sum(data))
    if not (np.all(np.isfinite(data)) and total > 0):
        raise ValueError(f"{name}: a PSF image must be finite with a positive sum (sum {total!r})")
    return ImagePsf(data / total)


def poisson_variance(image, gain: float, read_noise: float = 0.0):
    """Variance (counts²) of an image in counts, not sky-subtracted: max(image, 0)/gain + (read_noise/gain)².

    Arguments:
        image: counts (ADU).
        gain: electrons per count (> 0).
        read_noise: read noise in electrons (≥ 0).
    """
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be a positive number of electrons per count, got {gain!r}")
    if not (math.isfinite(read_noise) and read_noise >= 0):
        raise ValueError(f"read noise must be a number of electrons >= 0, got {read_noise!r}")
    img = np.asarray(image, np.float64)
    var = np.where(np.isfinite(img), np.maximum(img, 0.0), 0.0) / gain + (read_noise / gain) ** 2
    if not np.any(var > 0):
        raise ValueError("gain/read noise give a zero variance everywhere (an empty image and read noise 0)")
    return var


def exposure_from_arrays(
    image,
    variance=None,
    *,
    mask=None,
    psf=None,
    gain: float | None = None,
    read_noise: float = 0.0,
    saturation: float | None = None,
    valid_min: float | None = None,
    valid_max: float | None = None,
    xy0=(0, 0),
    wcs=None,
    photo_calib: float = 1.0,
    name: str = "image",
) -> Exposure:
    """An `Exposure` from plain arrays, with the noise model and masks that HOTPANTS users give on its command line.

    Arguments:
        image: 2-D pixels in counts.
        variance: a variance plane; None → from `gain` and `read_noise` (`poisson_variance`: sources'
            Poisson term included; the image must not be sky-subtracted), else one constant, the sky's
            (0.7413·IQR)² after a 32-px median background.
        mask: None, or an integer/boolean image: non-zero pixels are flagged BAD.
        psf: a `jd.Psf`, a FWHM in pixels, a PSF image (odd square array), the path of a PSF FITS file, or
            None → `estimate_psf` from the image's stars.
        gain: electrons per count, or None (see `variance`).
        read_noise: electrons (used with `gain`).
        saturation: pixels at or above it are flagged SAT (and their value kept).
        valid_min, valid_max: pixels outside [valid_min, valid_max] are flagged NO_DATA.
        xy0, wcs, photo_calib: as `jd.Exposure`.
        name: what error messages call this image (e.g. the file name).

    Returns:
        The `jd.Exposure` (float32 unless the image is float64; mask planes `jd.MASK_PLANES`).
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"{name}: the image must be 2-D, got shape {img.shape}")
    dtype = np.float64 if img.dtype == np.float64 else np.float32
    img = img.astype(dtype)
    table = as_plane_table(MASK_PLANES)
    bits = np.zeros(img.shape, np.int32)
    finite = np.isfinite(img)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape:
            raise ValueError(f"{name}: the mask image has shape {m.shape}, the image {img.shape}")
        bits |= np.where(m != 0, 1 << plane_bit(table, "BAD"), 0).astype(np.int32)
    if saturation is not None:
        bits |= np.where(finite & (img >= saturation), 1 << plane_bit(table, "SAT"), 0).astype(np.int32)
    outside = ~finite
    if valid_min is not None:
        outside |= finite & (img < valid_min)
    if valid_max is not None:
        outside |= finite & (img > valid_max)
    bits |= np.where(outside, 1 << plane_bit(table, "NO_DATA"), 0).astype(np.int32)
    usable = finite & (bits == 0)
    if not usable.any():
        raise ValueError(f"{name}: no pixel is finite and unflagged (check the saturation and valid range)")
    if variance is not None:
        var = np.asarray(variance, dtype)
        if var.shape != img.shape:
            raise ValueError(f"{name}: the variance has shape {var.shape}, the image {img.shape}")
    elif gain is not None:
        var = poisson_variance(img, float(gain), float(read_noise)).astype(dtype)
    else:
        level = _estimate_variance(np.where(usable, img, np.nan))
        var = np.full(img.shape, level, dtype)
    var = np.where(finite, var, np.inf).astype(dtype)  # non-finite pixels carry no data (flagged NO_DATA)
    if psf is None:
        psf = estimate_psf(img, var, ~usable, name=name, saturation=saturation)
    elif not isinstance(psf, Psf):
        psf = psf_from_option(psf, f"{name}: PSF")
    return Exposure(img, var, bits, psf=psf, xy0=xy0, photo_calib=photo_calib, wcs=wcs, mask_planes=table)


def _smooth(a, sigma):
    h = int(math.ceil(4 * sigma))
    g = np.exp(-0.5 * (np.arange(-h, h + 1) / sigma) ** 2)
    g /= g.sum()
    a = np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 0, a)
    return np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 1, a), g


def _background(image, good, bin_size=32):
    """Median per bin_size² box (bins without good pixels take the overall median), nearest-box upsampled."""
    ny, nx = image.shape
    nby, nbx = -(-ny // bin_size), -(-nx // bin_size)
    pad = np.full((nby * bin_size, nbx * bin_size), np.nan)
    pad[:ny, :nx] = np.where(good, image, np.nan)
    boxes = pad.reshape(nby, bin_size, nbx, bin_size).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    has = np.isfinite(boxes).any(-1)
    med = np.full((nby, nbx), np.nanmedian(pad))
    med[has] = np.nanmedian(boxes[has], axis=-1)
    return np.repeat(np.repeat(med, bin_size, 0), bin_size, 1)[:ny, :nx]


def _fourier_shift(stamp, dx, dy):
    """The stamp moved by (dx, dy) pixels (periodic; the stamps are background-subtracted and padded)."""
    ny, nx = stamp.shape
    fy, fx = np.fft.fftfreq(ny)[:, None], np.fft.fftfreq(nx)[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(stamp) * np.exp(-2j * np.pi * (fx * dx + fy * dy))))


def estimate_psf(image, variance, bad=None, *, name: str = "image", saturation: float | None = None) -> Psf:
    """A PSF measured on the image's bright, isolated, unsaturated stars.

    Candidates are peaks of the image smoothed with a Gaussian of σ 1.5 px at S/N > 30 with no flagged pixel
    and no brighter peak within their 25 × 25 stamp, and whose peak is below 80 % of `saturation` (if
    given). Each stamp loses its border median; stars whose adaptive-moment width departs by more than 25 %
    from the median (galaxies, blends, cosmic rays) are dropped. With at least 5 stars the PSF is the median
    of their flux-normalised stamps, each recentred (Fourier shift) on its centroid: an `ImagePsf`
    (25 × 25); with 2–4 a circular `GaussianPsf` of their median width.

    Arguments:
        image, variance: 2-D arrays (counts, counts²).
        bad: boolean image of pixels to ignore, or None.
        name: the image's name (file) for the error message.
        saturation: the saturation level, or None.

    Raises:
        ValueError: fewer than 2 usable stars (the message names the image and says what to pass instead).
    """
    img = np.asarray(image, np.float64)
    var = np.asarray(variance, np.float64)
    good = np.isfinite(img) & np.isfinite(var) & (var > 0)
    if bad is not None:
        good &= ~np.asarray(bad, bool)
    bg = _background(img, good)
    resid = np.where(good, img - bg, 0.0)
    num, g = _smooth(resid, _FIND_SIGMA)
    den, _ = _smooth(np.where(good, var, 0.0), _FIND_SIGMA)
    # variance of the smoothed image: Σg² per axis pair; approximate with the smoothed variance × Σg²·Σg²/(Σg)²
    snr = num / np.sqrt(np.maximum(den * float(np.sum(g**2)) ** 2, 1e-300))
    h = _STAMP_HALF
    ny, nx = img.shape
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(snr, 1, constant_values=-np.inf)
    local_max = sliding_window_view(padded, (3, 3)).max(axis=(-1, -2))
    peaks = (snr >= local_max) & (snr > _MIN_SNR) & good
    peaks[:h, :] = peaks[-h:, :] = False
    peaks[:, :h] = peaks[:, -h:] = False
    rows, cols = np.nonzero(peaks)
    order = np.argsort(-snr[rows, cols])
    rows, cols = rows[order], cols[order]
    all_peaks = (snr >= local_max) & (snr > 5.0)
    stamps, widths, centres = [], [], []
    for r, c in zip(rows, cols, strict=True):
        win = (slice(r - h, r + h + 1), slice(c - h, c + h + 1))
        if not good[win].all():
            continue
        if saturation is not None and np.max(img[win]) >= 0.8 * saturation:
            continue
        others = all_peaks[win].copy()
        others[h, h] = False
        if others.any() and np.max(snr[win][others]) > 0.01 * snr[r, c]:
            continue  # a neighbour inside the stamp brighter than 1 % of the star
        stamp = img[win] - np.median(np.concatenate([img[win][0], img[win][-1], img[win][:, 0], img[win][:, -1]]))
        flux = stamp.sum()
        if not flux > 0:
            continue
        stamps.append(stamp / flux)
        if len(stamps) >= _MAX_STARS:
            break
    if stamps:
        ixx, iyy = adaptive_moments(np.stack(stamps).astype(np.float64), xp=np)
        ok = np.isfinite(ixx) & np.isfinite(iyy)
        stamps = [s for s, k in zip(stamps, ok, strict=True) if k]
        ixx, iyy = ixx[ok], iyy[ok]
        yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
        for s, a, b in zip(stamps, ixx, iyy, strict=True):
            w = np.exp(-0.5 * (xx**2 / a + yy**2 / b)) * s
            centres.append((float(np.sum(w * xx) / np.sum(w)), float(np.sum(w * yy) / np.sum(w))))
            widths.append(math.sqrt(0.5 * (a + b)))
    widths = np.asarray(widths)
    if widths.size:
        keep = np.abs(widths / np.median(widths) - 1) < 0.25
    else:
        keep = np.zeros(0, bool)
    n = int(keep.sum())
    if n < _MIN_STARS_GAUSSIAN:
        raise ValueError(
            f"{name}: no PSF given and too few bright, isolated, unsaturated stars to measure one ({n} found, "
            f"need {_MIN_STARS_GAUSSIAN}); give the PSF FWHM in pixels (command line: --science-psf / "
            "--template-psf FWHM) or a PSF image"
        )
    sigma = float(np.median(widths[keep]))
    if n < _MIN_STARS_IMAGE:
        return GaussianPsf(sigma, 2 * math.ceil(4 * sigma) + 1)
    shifted = [_fourier_shift(s, -cx, -cy) for s, k, (cx, cy) in zip(stamps, keep, centres, strict=True) if k]
    stack = np.median(np.stack(shifted), axis=0)
    stack = stack / stack.sum()
    return ImagePsf(stack)


def config_from_file(path, base=None):
    """A `SubtractConfig` from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) mapping of its field names.

    Lists become tuples; ``solver`` may be ``"lstsq"`` or ``"optax"``. Unknown keys are an error naming them.
    A ``[subtract]`` table (TOML) or ``subtract:`` mapping (YAML), if present, is used instead of the top level.
    """
    import dataclasses

    from ._config import SubtractConfig
    from .solvers import LeastSquares, OptaxSolver

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise ValueError(f"config file {path}: reading YAML needs PyYAML (pip install pyyaml)") from err
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            raise ValueError(f"config file {path}: unknown format {ext!r}; use .toml, .yaml or .yml")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - tomllib/yaml parse errors: report them with the file name
        raise ValueError(f"config file {path}: cannot parse it ({type(err).__name__}: {err})") from err
    if isinstance(data, dict) and isinstance(data.get("subtract"), dict):
        data = data["subtract"]
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of SubtractConfig fields, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(SubtractConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"config file {path}: unknown SubtractConfig field(s) {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    if isinstance(values.get("solver"), str):
        names = {"lstsq": LeastSquares, "optax": OptaxSolver}
        if values["solver"] not in names:
            raise ValueError(f"config file {path}: solver must be 'lstsq' or 'optax', got {values['solver']!r}")
        values["solver"] = names[values["solver"]]()
    base = SubtractConfig() if base is None else base
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config file {path}: {err}") from err


def with_options(
    exposure: Exposure,
    *,
    name: str,
    psf=None,
    gain=None,
    read_noise=0.0,
    saturation=None,
    valid_min=None,
    valid_max=None,
    mask=None,
) -> Exposure:
    """An exposure read from a file with the command line's per-image options applied: `gain`/`read_noise`
    replace the variance plane (`poisson_variance`), `mask` (non-zero → BAD), `saturation` (→ SAT) and the
    valid range (→ NO_DATA) are OR-ed into the mask, `psf` replaces the PSF; without any PSF one is estimated
    from the image (`estimate_psf`)."""
    img = np.asarray(exposure.image)
    bits = np.array(exposure.mask, np.int32)
    table = exposure.mask_planes

    def flag(plane, where):
        nonlocal bits
        bit = plane_bit(table, plane)
        if bit is None:
            raise ValueError(f"{name}: its mask has no {plane} plane to flag pixels in")
        bits |= np.where(where, 1 << bit, 0).astype(np.int32)

    finite = np.isfinite(img)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape:
            raise ValueError(f"{name}: the mask image has shape {m.shape}, the image {img.shape}")
        flag("BAD", m != 0)
    if saturation is not None:
        flag("SAT", finite & (img >= saturation))
    if valid_min is not None:
        flag("NO_DATA", finite & (img < valid_min))
    if valid_max is not None:
        flag("NO_DATA", finite & (img > valid_max))
    var = np.asarray(exposure.variance)
    if gain is not None:
        var = poisson_variance(img, float(gain), float(read_noise)).astype(var.dtype)
    if psf is not None:
        psf = psf_from_option(psf, f"{name}: PSF")
    elif exposure.psf is not None:
        psf = exposure.psf
    else:
        unusable = ~finite | ((bits & bitmask(table, ("BAD", "SAT", "NO_DATA"))) != 0)
        psf = estimate_psf(img, var, unusable, name=name, saturation=saturation)
    return Exposure(
        img,
        var,
        bits,
        psf=psf,
        xy0=exposure.xy0,
        photo_calib=exposure.photo_calib,
        wcs=exposure.wcs,
        mask_planes=table,
    )
