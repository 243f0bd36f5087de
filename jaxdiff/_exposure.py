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


def _as_float(x, name: str):
    arr = to_jax(_native(x))
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return arr


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
            mask = jnp.zeros(image.shape, jnp.int32)
        else:
            mask = to_jax(_native(mask))
            if not jnp.issubdtype(mask.dtype, jnp.integer):
                if is_concrete(mask) and not np.array_equal(np.asarray(mask), np.round(np.asarray(mask))):
                    raise ValueError(f"mask must hold integer bits, got dtype {mask.dtype} with fractions")
                mask = mask.astype(jnp.int32)
            mask = mask.astype(jnp.int32)
            if mask.shape != image.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}")
        xy0 = to_jax(xy0)
        if xy0.shape[-1:] != (2,):
            raise ValueError(f"xy0 must be (x0, y0), got shape {tuple(xy0.shape)}")
        if not jnp.issubdtype(xy0.dtype, jnp.integer):
            if is_concrete(xy0) and not np.array_equal(np.asarray(xy0), np.round(np.asarray(xy0))):
                raise ValueError(f"xy0 must be integer pixel offsets, got {np.asarray(xy0)!r}")
            xy0 = xy0.astype(jnp.int32)
        self.image = image
        self.variance = variance
        self.mask = mask
        self.psf = as_psf(psf)
        self.xy0 = xy0.astype(jnp.int32)
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
