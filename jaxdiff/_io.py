"""FITS input and output of `Exposure` in the LSST multi-extension layout.

Layout written by `write_exposure` and understood by `read_exposure`:

- HDU 0: empty primary HDU.
- ``IMAGE``: the pixels (float32 or float64), with the WCS (`wcs.to_header(relax=True)`), the pixel
  origin as ``LTV1 = -x0``, ``LTV2 = -y0`` (afw's convention) and the flux scale as ``PHOTOCAL``
  (calibrated flux per count).
- ``MASK``: int32 bit mask; one header keyword ``MP_<NAME> = bit`` per mask plane (``HIERARCH`` for long
  names).
- ``VARIANCE``: per-pixel variance, same dtype as the image.
- ``PSF``: the PSF image at the centre of the model, unit sum. A `GaussianPsf` also records
  ``PSFTYPE = 'GAUSSIAN'`` and ``PSFSIGMA = sigma`` and is read back as a `GaussianPsf`; every other PSF
  is read back as an `ImagePsf`.
"""

import os
import uuid
import warnings

import jax
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ._exposure import Exposure
from ._mask import as_plane_table
from ._psf import GaussianPsf, ImagePsf

_BACKGROUND_BIN = 32
_IQR_TO_SIGMA = 0.7413  # 1 / (2 Φ⁻¹(0.75)): the standard deviation of a Gaussian from its interquartile range
_GAUSSIAN_TAG = "GAUSSIAN"


def _keyword(name: str) -> str:
    """The header keyword for an `MP_` entry: HIERARCH when it is no standard 8-character keyword."""
    key = f"MP_{name}"
    standard = len(key) <= 8 and all(c.isdigit() or c.isupper() or c in "_-" for c in key)
    return key if standard else f"HIERARCH {key}"


def _native(data, dtype) -> np.ndarray:
    """One copy of FITS data into native byte order and the given dtype."""
    return np.asarray(data).astype(np.dtype(dtype).newbyteorder("="), copy=True)


def _float_dtype(data: np.ndarray) -> np.dtype:
    """float64 for float64 data (either byte order), float32 for everything else."""
    return np.dtype(np.float64 if data.dtype.kind == "f" and data.dtype.itemsize == 8 else np.float32)


def _two_d(data, path, what: str) -> np.ndarray | None:
    """The data of an image HDU as 2-D (dropping leading length-1 axes), None when it holds no image."""
    if data is None:
        return None
    arr = np.asarray(data)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: {what} must be a 2-D image, got shape {arr.shape}")
    return arr


def _linear_weights(n: int, centres: np.ndarray) -> np.ndarray:
    """(n, len(centres)) weights interpolating linearly between centres, extrapolating past the ends."""
    weights = np.zeros((n, centres.size))
    if centres.size == 1:
        weights[:, 0] = 1.0
        return weights
    pos = np.arange(n, dtype=np.float64)
    left = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, centres.size - 2)
    t = (pos - centres[left]) / (centres[left + 1] - centres[left])
    rows = np.arange(n)
    weights[rows, left] = 1.0 - t
    weights[rows, left + 1] = t
    return weights


def _estimate_variance(image: np.ndarray, bin_size: int = _BACKGROUND_BIN) -> float:
    """A constant variance for an image without a variance plane: (0.7413·IQR)² after a median background.

    The background is the median of the finite pixels in each bin_size × bin_size box (partial boxes at the
    far edges included), interpolated bilinearly between box centres and extrapolated linearly to the borders,
    so that a linear gradient is removed exactly. The interquartile range of the finite residuals gives
    σ = 0.7413·IQR, robust to stars and cosmic rays.

    Arguments:
        image: the pixels, shape (ny, nx); non-finite pixels are ignored.
        bin_size: side of the background boxes in pixels.

    Returns:
        The variance σ² in image units squared (NaN when the image has no finite pixel).
    """
    ny, nx = image.shape
    nby, nbx = -(-ny // bin_size), -(-nx // bin_size)
    padded = np.full((nby * bin_size, nbx * bin_size), np.nan)
    padded[:ny, :nx] = np.where(np.isfinite(image), image, np.nan)
    boxes = padded.reshape(nby, bin_size, nbx, bin_size).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    finite = np.isfinite(boxes)
    if not finite.any():
        return float("nan")
    counts = finite.sum(-1)
    medians = np.full((nby, nbx), np.nan)
    filled = counts > 0
    medians[filled] = np.nanmedian(boxes[filled], axis=-1)
    medians[~filled] = np.median(medians[filled])

    def centres(n: int, nb: int) -> np.ndarray:
        starts = np.arange(nb) * bin_size
        return 0.5 * (starts + np.minimum(starts + bin_size, n) - 1)

    background = _linear_weights(ny, centres(ny, nby)) @ medians @ _linear_weights(nx, centres(nx, nbx)).T
    resid = (image - background)[np.isfinite(image)]
    q25, q75 = np.percentile(resid, [25.0, 75.0])
    return float((_IQR_TO_SIGMA * (q75 - q25)) ** 2)


def _header_value(headers, key: str):
    for header in headers:
        if key in header:
            return header[key]
    return None


def _read_wcs(headers) -> WCS | None:
    for header in headers:
        if "CTYPE1" in header and "CTYPE2" in header:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(header, naxis=2)
            return wcs if wcs.has_celestial else None
    return None


def _find_image(hdul, path):
    """The IMAGE extension, else the first HDU (primary first) holding a 2-D image."""
    if "IMAGE" in hdul:
        return hdul["IMAGE"]
    for hdu in hdul:
        if hdu.is_image and hdu.name not in ("MASK", "VARIANCE", "PSF") and hdu.data is not None:
            return hdu
    raise ValueError(
        f"{path}: no image found; expected an IMAGE extension or 2-D data in the primary HDU "
        f"(HDUs: {[h.name for h in hdul]})"
    )


def _read_psf(hdu, path):
    data = _two_d(hdu.data, path, "the PSF HDU")
    psf = _native(data, _float_dtype(data))
    total = float(np.sum(psf))
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"{path}: the PSF HDU has sum {total!r}; it cannot be normalised")
    header = hdu.header
    if header.get("PSFTYPE") == _GAUSSIAN_TAG and "PSFSIGMA" in header:
        return GaussianPsf(np.asarray(header["PSFSIGMA"], psf.dtype), psf.shape[-1])
    return ImagePsf(psf / total)


def _read(hdul, path) -> Exposure:
    image_hdu = _find_image(hdul, path)
    raw = _two_d(image_hdu.data, path, f"the image HDU {image_hdu.name!r}")
    dtype = _float_dtype(raw)
    image = _native(raw, dtype)
    headers = [image_hdu.header] if image_hdu is hdul[0] else [image_hdu.header, hdul[0].header]

    if "VARIANCE" in hdul:
        variance = _native(_two_d(hdul["VARIANCE"].data, path, "the VARIANCE HDU"), dtype)
        if variance.shape != image.shape:
            raise ValueError(f"{path}: VARIANCE shape {variance.shape} does not match image shape {image.shape}")
        bad = np.isfinite(image) & ~(np.isfinite(variance) & (variance >= 0))
        if np.any(bad):
            raise ValueError(
                f"{path}: the variance must be finite and >= 0 where the image is finite; {int(bad.sum())} pixels "
                f"are not, e.g. {variance[tuple(np.argwhere(bad)[0])]!r}"
            )
    else:
        var = _estimate_variance(image)
        if not np.isfinite(var):
            raise ValueError(f"{path}: the image has no finite pixels to estimate a variance from")
        variance = np.full(image.shape, var, dtype)

    mask, planes = None, None
    if "MASK" in hdul:
        mask_hdu = hdul["MASK"]
        mask = _native(_two_d(mask_hdu.data, path, "the MASK HDU"), np.int32)
        if mask.shape != image.shape:
            raise ValueError(f"{path}: MASK shape {mask.shape} does not match image shape {image.shape}")
        planes = [(key[3:], int(value)) for key, value in mask_hdu.header.items() if key.startswith("MP_")] or None

    psf = _read_psf(hdul["PSF"], path) if "PSF" in hdul else None
    ltv = [_header_value(headers, key) for key in ("LTV1", "LTV2")]
    xy0 = tuple(int(round(-float(v))) if v is not None else 0 for v in ltv)
    photo_calib = _header_value(headers, "PHOTOCAL")
    try:
        return Exposure(
            image,
            variance,
            mask=mask,
            psf=psf,
            xy0=xy0,
            photo_calib=1.0 if photo_calib is None else float(photo_calib),
            wcs=_read_wcs(headers),
            mask_planes=as_plane_table(planes),
        )
    except ValueError as err:
        raise ValueError(f"{path}: the file does not make a valid Exposure: {err}") from err


def read_exposure(path: str | os.PathLike) -> Exposure:
    """Read an `Exposure` from a multi-extension LSST-layout FITS file or a plain single-image FITS file.

    The image is the ``IMAGE`` extension (else the first HDU with 2-D data); float64 pixels stay float64,
    everything else becomes float32 (native byte order, one copy). Optional HDUs: ``MASK`` (int32, planes from
    its ``MP_<NAME>`` keywords; absent → all zero with `jd.MASK_PLANES`), ``VARIANCE`` (absent → a constant
    plane (0.7413·IQR)² of the image after subtracting a 32-pixel-box median background, see
    `_estimate_variance`), ``PSF`` (absent → None; normalised to unit sum; a `GaussianPsf` written by
    `write_exposure` comes back as one). xy0 = (−LTV1, −LTV2) and photo_calib = PHOTOCAL from the image header
    (or the primary header), defaults (0, 0) and 1.0; the WCS is `astropy.wcs.WCS` of that header when it has
    celestial axes, else None.

    Arguments:
        path: the FITS file.

    Returns:
        The `jd.Exposure`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, not FITS, has no image or inconsistent HDUs (the message
            names the file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file")
    try:
        with fits.open(path, memmap=False) as hdul:
            return _read(hdul, path)
    except (OSError, TypeError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: not a readable FITS file ({type(err).__name__}: {err})") from err
    except ValueError as err:
        if str(err).startswith(path):
            raise
        raise ValueError(f"{path}: corrupt or truncated FITS data ({err})") from err


def _hdus(exposure: Exposure) -> fits.HDUList:
    image, variance, mask, xy0, photo_calib = jax.device_get(
        (exposure.image, exposure.variance, exposure.mask, exposure.xy0, exposure.photo_calib)
    )
    header = fits.Header()
    if exposure.wcs is not None:
        header.update(exposure.wcs.to_header(relax=True))
    header["LTV1"] = (-int(xy0[0]), "-x0: array origin in the parent frame (afw)")
    header["LTV2"] = (-int(xy0[1]), "-y0: array origin in the parent frame (afw)")
    header["PHOTOCAL"] = (float(photo_calib), "calibrated flux per count")
    mask_header = fits.Header()
    for name, bit in exposure.mask_planes:
        mask_header[_keyword(name)] = bit
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(np.asarray(image), header=header, name="IMAGE"),
        fits.ImageHDU(np.asarray(mask, np.int32), header=mask_header, name="MASK"),
        fits.ImageHDU(np.asarray(variance, image.dtype), name="VARIANCE"),
    ]
    psf = exposure.psf
    if psf is not None:
        psf_header = fits.Header()
        if isinstance(psf, GaussianPsf) and np.ndim(psf.width) == 0:
            psf_header["PSFTYPE"] = (_GAUSSIAN_TAG, "circular Gaussian PSF")
            psf_header["PSFSIGMA"] = (float(jax.device_get(psf.width)), "Gaussian sigma in pixels")
        hdus.append(fits.ImageHDU(np.asarray(jax.device_get(psf.image())), header=psf_header, name="PSF"))
    return fits.HDUList(hdus)


def write_exposure(path: str | os.PathLike, exposure: Exposure) -> None:
    """Write an `Exposure` as multi-extension FITS in the LSST layout (see the module docstring), atomically.

    The file is written to a temporary file in the same directory and moved onto `path` with `os.replace`;
    on any failure the temporary file is removed and an existing `path` is left untouched.

    Arguments:
        path: the output file (overwritten if present).
        exposure: one (unbatched) exposure with a 2-D image.
    """
    if not isinstance(exposure, Exposure):
        raise TypeError(f"write_exposure needs a jd.Exposure, got {type(exposure).__name__}")
    if exposure.image.ndim != 2:
        raise ValueError(
            f"write_exposure writes one exposure; got a batch with image shape {tuple(exposure.image.shape)}"
        )
    path = os.fspath(path)
    hdul = _hdus(exposure)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            hdul.writeto(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
