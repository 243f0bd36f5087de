"""PSF models: abstract `Psf`, `ImagePsf`, `GaussianPsf`, and the spatially varying `GridPsf`."""

import abc
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._types import Array, Float, Kernel, Scalar, is_concrete, to_jax

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def gaussian_image(sigma_x, sigma_y, size: int, dx=0.0, dy=0.0, dtype=None) -> Kernel:
    """A unit-sum Gaussian sampled at pixel centres on a size × size grid, centred at (h + dx, h + dy)."""
    h = (size - 1) / 2
    dtype = dtype or jnp.result_type(float)
    off = jnp.arange(size, dtype=dtype) - h
    gx = jnp.exp(-0.5 * ((off - dx) / sigma_x) ** 2)
    gy = jnp.exp(-0.5 * ((off - dy) / sigma_y) ** 2)
    img = gy[:, None] * gx[None, :]
    return img / jnp.sum(img)


def adaptive_moments(image: Kernel, n_iter: int = 40, xp=jnp) -> tuple[Scalar, Scalar]:
    """Adaptive (Gaussian-weighted, iterated) second moments Ixx, Iyy of a PSF image.

    The weight's covariance is iterated to twice the weighted moments; at the fixed point it
    equals the covariance of a Gaussian PSF (as LSST's `computeShape` / HSM adaptive moments).

    Arguments:
        image: the PSF image, odd-sized and centred; leading axes are a batch of images.
        n_iter: iterations (static); 40 converge to float64 precision for well-sampled PSFs.
        xp: `jax.numpy` (traceable, differentiable) or `numpy`, for concrete images on the host: the same
            iteration in float64 (`_host_adaptive_moments`, which may stop early at a fixed point) without
            compiling a program for each PSF size, dtype and batch.

    Returns:
        (Ixx, Iyy) in pixels² (the batch's shape), NaN when the iteration fails (e.g. an empty image).
    """
    if xp is np:
        return _host_adaptive_moments(np.asarray(image, np.float64), n_iter)
    ny, nx = image.shape[-2:]
    dtype = jnp.result_type(image.dtype, jnp.float32)
    img = jnp.asarray(image).astype(dtype)
    yy, xx = jnp.meshgrid(
        jnp.arange(ny, dtype=dtype) - (ny - 1) / 2, jnp.arange(nx, dtype=dtype) - (nx - 1) / 2, indexing="ij"
    )
    total = jnp.sum(img, axis=(-2, -1))
    safe_total = jnp.where(total != 0, total, 1.0)
    ixx0 = jnp.sum(img * xx**2, axis=(-2, -1)) / safe_total
    iyy0 = jnp.sum(img * yy**2, axis=(-2, -1)) / safe_total
    zero = 0.0 * ixx0
    start = (zero, zero, jnp.clip(ixx0, 0.25, None), zero, jnp.clip(iyy0, 0.25, None))

    def body(_, state):
        cx, cy, wxx, wxy, wyy = (v[..., None, None] for v in state)
        det = wxx * wyy - wxy**2
        dx, dy = xx - cx, yy - cy
        q = (wyy * dx**2 - 2 * wxy * dx * dy + wxx * dy**2) / det
        w = img * jnp.exp(-0.5 * q)
        s = jnp.sum(w, axis=(-2, -1))
        moment = lambda f: jnp.sum(w * f, axis=(-2, -1)) / s
        mx, my = moment(xx), moment(yy)
        dx, dy = xx - mx[..., None, None], yy - my[..., None, None]
        return mx, my, 2 * moment(dx**2), 2 * moment(dx * dy), 2 * moment(dy**2)

    state = lax.fori_loop(0, n_iter, body, start)
    ixx, iyy = state[2], state[4]
    ok = jnp.isfinite(ixx) & jnp.isfinite(iyy) & (ixx > 0) & (iyy > 0)
    return jnp.where(ok, ixx, jnp.nan), jnp.where(ok, iyy, jnp.nan)


def _host_adaptive_moments(image: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """`adaptive_moments` of concrete float64 images on the host, image by image in Python floats.

    The Gaussian weight's exponent and the five weighted sums are linear in the monomials 1, x, y, x², xy, y²,
    so an iteration is two small contractions with their (6, n) table and one `exp`: a few numpy calls instead
    of some twenty (the per-call overhead dominated on PSF-sized images). The central moments come from raw
    ones (E[x²] − E[x]²), which agrees with the traced two-pass form to ~1e-15 relative for PSF images.
    `einsum` and not `@`: a (6,) × (6, n) matmul is a BLAS gemv, and waking OpenBLAS's threads costs more
    than the product.
    """
    ny, nx = image.shape[-2:]
    yy, xx = np.meshgrid(np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2, indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    mono = np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy])
    flat = image.reshape(-1, ny * nx)
    out = np.array([_host_moments_one(f, mono, n_iter) for f in flat]).reshape(image.shape[:-2] + (2,))
    return out[..., 0], out[..., 1]


def _host_moments_one(f: np.ndarray, mono: np.ndarray, n_iter: int) -> tuple[float, float]:
    """(Ixx, Iyy) of one flattened image (see `_host_adaptive_moments`); NaN when the iteration fails."""
    total, _, _, sxx, _, syy = np.einsum("n,kn->k", f, mono).tolist()
    total = total if total != 0 else 1.0
    cx = cy = wxy = 0.0
    wxx, wyy = max(sxx / total, 0.25), max(syy / total, 0.25)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a failed iteration ends in NaN
            for _ in range(n_iter):
                det = wxx * wyy - wxy * wxy
                a, b, c = wyy / det, -2.0 * wxy / det, wxx / det  # q = a dx² + b dx dy + c dy², dx = x − cx
                coef = [
                    a * cx * cx + b * cx * cy + c * cy * cy,
                    -2.0 * a * cx - b * cy,
                    -2.0 * c * cy - b * cx,
                    a,
                    b,
                    c,
                ]
                w = f * np.exp(-0.5 * np.einsum("k,kn->n", np.array(coef), mono))
                s, mx, my, mxx, mxy, myy = np.einsum("n,kn->k", w, mono).tolist()
                state = (cx, cy, wxx, wxy, wyy)
                cx, cy = mx / s, my / s
                wxx, wxy, wyy = 2.0 * (mxx / s - cx * cx), 2.0 * (mxy / s - cx * cy), 2.0 * (myy / s - cy * cy)
                if (cx, cy, wxx, wxy, wyy) == state:  # a fixed point in floats: the remaining iterations repeat it
                    break
    except ZeroDivisionError:
        return math.nan, math.nan
    ok = math.isfinite(wxx) and math.isfinite(wyy) and wxx > 0 and wyy > 0
    return (wxx, wyy) if ok else (math.nan, math.nan)


def pair_sigma_xy(a: "Psf", b: "Psf") -> tuple[Array, Array]:
    """`jnp.stack(p.sigma_xy())` of two PSFs, (2,) each. Where both measure their widths from their images
    (no analytic override) and the images agree in shape and dtype, the two adaptive-moment iterations run as
    one batched loop: one program fragment instead of two."""
    measured = type(a).sigma_xy is Psf.sigma_xy and type(b).sigma_xy is Psf.sigma_xy
    if measured:
        ia, ib = a.image(), b.image()
        if ia.shape == ib.shape and ia.dtype == ib.dtype:
            ixx, iyy = adaptive_moments(jnp.stack([ia, ib]))
            w = jnp.sqrt(jnp.stack([ixx, iyy], axis=-1))
            return w[0], w[1]
    return jnp.stack(a.sigma_xy()), jnp.stack(b.sigma_xy())


def mean_sigma(sigma_xy) -> Scalar:
    """The single Gaussian-equivalent width √((σx² + σy²)/2) of widths (σx, σy) stacked on the last axis."""
    return jnp.sqrt(0.5 * jnp.sum(jnp.square(sigma_xy), axis=-1))


def host_sigma_xy(psf: "Psf", batched: bool = False) -> np.ndarray:
    """(σx, σy) of a concrete PSF at its centre, measured on the host (float64 numpy, no compiled program):
    shape (2,), or (B, 2) for a stacked batch of PSFs (`batched`); NaN where the moments fail."""
    return psf._host_sigma_xy(batched)


class Psf(eqx.Module):
    """Base of PSF models: a normalised, odd-sized kernel image at any position."""

    @abc.abstractmethod
    def image(self, x=None, y=None) -> Kernel:
        """The unit-sum PSF image at parent position (x, y) (the model's centre when omitted)."""

    def sigma_xy(self, x=None, y=None) -> tuple[Scalar, Scalar]:
        """Gaussian-equivalent widths (√Ixx, √Iyy) in pixels from adaptive second moments."""
        ixx, iyy = adaptive_moments(self.image(x, y))
        return jnp.sqrt(ixx), jnp.sqrt(iyy)

    def _host_image(self) -> np.ndarray:
        """The centre image as a numpy array (models override it where `image` would run eager jax ops)."""
        return np.asarray(self.image())

    def _host_sigma_xy(self, batched: bool) -> np.ndarray:
        """`sigma_xy` at the centre on the host, (2,) or (B, 2) for a stacked batch (see `host_sigma_xy`)."""
        image = np.asarray(eqx.filter_vmap(lambda p: p.image())(self)) if batched else self._host_image()
        ixx, iyy = adaptive_moments(image.astype(np.float64), xp=np)
        return np.sqrt(np.stack([ixx, iyy], axis=-1))

    def sigma(self, x=None, y=None) -> Scalar:
        """Gaussian-equivalent width in pixels, √((Ixx + Iyy)/2)."""
        return mean_sigma(jnp.stack(self.sigma_xy(x, y)))

    def fwhm(self, x=None, y=None) -> Scalar:
        """Full width at half maximum in pixels, 2√(2 ln 2)·sigma."""
        return FWHM_PER_SIGMA * self.sigma(x, y)

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Side of the PSF image in pixels (odd)."""


def _check_kernel_image(arr, what: str) -> None:
    if arr.ndim < 2:
        raise ValueError(f"{what} must be a 2-D image, got shape {tuple(arr.shape)}")
    ny, nx = arr.shape[-2:]
    if ny != nx or ny % 2 == 0:
        raise ValueError(f"{what} must be square and odd-sized (centred), got shape {tuple(arr.shape)}")
    if arr.ndim == 2 and is_concrete(arr):
        a = np.asarray(arr, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what} of shape {a.shape} has non-finite values")
        total = float(a.sum())
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"{what} must be normalised to sum 1 (got sum {total:.6g}); divide it by its sum")


class ImagePsf(Psf):
    """A constant PSF given as an image (odd-sized, centred, unit sum).

    Arguments:
        array: the PSF image, shape (k, k) with k odd.
    """

    array: Float[Array, "k k"]

    def __init__(self, array):
        array = to_jax(array)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(jnp.float32)
        _check_kernel_image(array, "PSF image")
        self.array = array

    def image(self, x=None, y=None) -> Kernel:
        del x, y
        return self.array

    @property
    def size(self) -> int:
        return int(self.array.shape[-1])


class GaussianPsf(Psf):
    """A circular Gaussian PSF of width `sigma` (pixels) drawn on a `size` × `size` grid.

    `width` holds sigma as a differentiable leaf (the method `sigma()` returns it).
    """

    width: Float[Array, ""]
    _size: int = eqx.field(static=True)

    def __init__(self, sigma, size: int | None = None):
        width = jnp.asarray(sigma)
        if not jnp.issubdtype(width.dtype, jnp.floating):
            width = width.astype(jnp.float32)
        if size is None:
            if not is_concrete(width):
                raise ValueError("GaussianPsf needs an explicit size when sigma is traced")
            size = 2 * int(math.ceil(4 * float(np.max(np.asarray(width))))) + 1
        size = int(size)
        if size % 2 == 0 or size < 3:
            raise ValueError(f"GaussianPsf size must be odd and >= 3, got {size}")
        if is_concrete(width) and width.ndim == 0 and not float(width) > 0:
            raise ValueError(f"GaussianPsf sigma must be positive, got {float(width)}")
        self.width = width
        self._size = size

    def image(self, x=None, y=None) -> Kernel:
        del x, y
        return gaussian_image(self.width, self.width, self._size, dtype=self.width.dtype)

    def sigma_xy(self, x=None, y=None):
        del x, y
        return self.width, self.width

    def _host_sigma_xy(self, batched: bool) -> np.ndarray:
        w = np.asarray(self.width, np.float64)
        return np.stack([w, w], axis=-1)

    @property
    def size(self) -> int:
        return self._size


class GridPsf(Psf):
    """A spatially varying PSF: images at the nodes of a regular grid, bilinear in between.

    Arguments:
        images: node images, shape (gy, gx, k, k), each unit-sum, k odd.
        box: (x_min, y_min, x_max, y_max) parent coordinates of the first and last node centres.
    """

    images: Float[Array, "gy gx k k"]
    box: Float[Array, "4"]

    def __init__(self, images, box):
        images = to_jax(images)
        if images.ndim != 4:
            raise ValueError(f"GridPsf images must have shape (gy, gx, k, k), got {tuple(images.shape)}")
        # checked on the host when concrete: indexing the device array would compile a program per shape
        _check_kernel_image(np.asarray(images)[0, 0] if is_concrete(images) else images[0, 0], "GridPsf node image")
        self.images = images
        self.box = jnp.asarray(box, dtype=images.dtype)

    def image(self, x=None, y=None) -> Kernel:
        return self._interpolate(x, y, jnp)

    def _host_image(self) -> np.ndarray:
        return self._interpolate(None, None, np)

    def _interpolate(self, x, y, xp):
        """`image` with `xp` = jax.numpy, or numpy for the host (no eager program per operation)."""
        gy, gx = self.images.shape[:2]
        x0, y0, x1, y1 = (xp.asarray(self.box)[i] for i in range(4))
        x = 0.5 * (x0 + x1) if x is None else x
        y = 0.5 * (y0 + y1) if y is None else y
        fx = xp.clip((x - x0) / xp.where(x1 > x0, x1 - x0, 1.0) * (gx - 1), 0, gx - 1)
        fy = xp.clip((y - y0) / xp.where(y1 > y0, y1 - y0, 1.0) * (gy - 1), 0, gy - 1)
        ix = xp.clip(xp.floor(fx).astype(int), 0, max(gx - 2, 0))
        iy = xp.clip(xp.floor(fy).astype(int), 0, max(gy - 2, 0))
        tx, ty = fx - ix, fy - iy
        ix1 = xp.minimum(ix + 1, gx - 1)
        iy1 = xp.minimum(iy + 1, gy - 1)
        im = xp.asarray(self.images)
        img = (
            (1 - tx) * (1 - ty) * im[iy, ix]
            + tx * (1 - ty) * im[iy, ix1]
            + (1 - tx) * ty * im[iy1, ix]
            + tx * ty * im[iy1, ix1]
        )
        return (img / xp.sum(img)).astype(self.images.dtype)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def as_psf(psf) -> Psf | None:
    """Accept None, a `Psf`, or a 2-D array (wrapped in `ImagePsf`)."""
    if psf is None or isinstance(psf, Psf):
        return psf
    return ImagePsf(psf)
