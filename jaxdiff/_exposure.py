"""`Exposure`: an image with its variance, bit mask, PSF, pixel origin, flux scale and WCS."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._mask import PlaneTable, as_plane_table
from ._psf import Psf, as_psf
from ._types import Array, Float, Image, Int, MaskImage, is_concrete, to_jax


def _native(x):
    """NumPy arrays in non-native byte order (FITS data are big-endian) as native copies; JAX rejects them."""
    if isinstance(x, np.ndarray) and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _as_float(x, name: str):
    dtype = _dtype(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {dtype}")
    return to_jax(_native(x), None if jnp.issubdtype(dtype, jnp.floating) else np.float32)


class Exposure(eqx.Module):
    """One image with its per-pixel variance, bit mask, PSF, origin and calibration.

    Arguments:
        image: pixel values, shape (ny, nx) (a leading batch axis is allowed for stacked pairs).
        variance: per-pixel variance in image units squared, same shape; finite and ≥ 0.
        mask: integer bit mask, same shape (`None`: all zero); bits per `mask_planes`.
        psf: a `jd.Psf`, a unit-sum odd-sized 2-D array (wrapped in `ImagePsf`), or None.
        xy0: parent-frame pixel coordinates (x0, y0) of element [0, 0] (integer leaf).
        photo_calib: calibrated flux per count (nJy/count in LSST terms); unused in arithmetic.
        wcs: an optional astropy WCS (static metadata, never traced).
        mask_planes: name → bit table (`jd.MASK_PLANES` by default), stored as (name, bit) pairs.
    """

    image: Image
    variance: Image
    mask: MaskImage
    psf: Psf | None
    xy0: Int[Array, "2"]
    photo_calib: Float[Array, ""]
    wcs: Any = eqx.field(static=True)
    mask_planes: PlaneTable = eqx.field(static=True)

    def __init__(self, image, variance, mask=None, psf=None, xy0=(0, 0), photo_calib=1.0, wcs=None, mask_planes=None):
        image = _as_float(image, "image")
        variance = _as_float(variance, "variance")
        if image.ndim < 2:
            raise ValueError(f"image must be 2-D (ny, nx), got shape {tuple(image.shape)}")
        if variance.shape != image.shape:
            raise ValueError(f"variance shape {tuple(variance.shape)} does not match image shape {tuple(image.shape)}")
        if mask is None:
            zeros = np.zeros if is_concrete(image) else jnp.zeros
            mask = to_jax(zeros(image.shape, np.int32))
        else:
            mask = _native(mask)
            if not jnp.issubdtype(_dtype(mask), jnp.integer):
                if is_concrete(mask) and not np.array_equal(np.asarray(mask), np.round(np.asarray(mask))):
                    raise ValueError(f"mask must hold integer bits, got dtype {_dtype(mask)} with fractions")
            mask = to_jax(mask, np.int32)
            if mask.shape != image.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}")
        if np.shape(xy0)[-1:] != (2,):
            raise ValueError(f"xy0 must be (x0, y0), got shape {tuple(np.shape(xy0))}")
        if not jnp.issubdtype(_dtype(xy0), jnp.integer):
            if is_concrete(xy0) and not np.array_equal(np.asarray(xy0), np.round(np.asarray(xy0))):
                raise ValueError(f"xy0 must be integer pixel offsets, got {np.asarray(xy0)!r}")
        self.image = image
        self.variance = variance
        self.mask = mask
        self.psf = as_psf(psf)
        self.xy0 = to_jax(xy0, np.int32)
        self.photo_calib = _as_float(photo_calib, "photo_calib")
        self.wcs = wcs
        self.mask_planes = as_plane_table(mask_planes)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of one image (the last two axes)."""
        return tuple(self.image.shape[-2:])

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x_min, y_min, x_max, y_max), inclusive parent pixel indices (needs a concrete xy0)."""
        x0, y0 = (int(v) for v in np.asarray(self.xy0).reshape(-1, 2)[0])
        ny, nx = self.shape
        return x0, y0, x0 + nx - 1, y0 + ny - 1
