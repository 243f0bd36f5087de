"""Preconvolution ("score" image, ALGORITHM §12): the matched science P ∗ S and its inner box."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from . import convolve as _convolve
from ._mask import bitmask, plane_bit
from ._psf import Psf
from ._stats import quantile_masked
from ._types import Array, Float, Image, Kernel, MaskImage, solve_dtype


class Preconvolved(eqx.Module):
    """The preconvolved science on the science box.

    Attributes:
        kernel: P, the science PSF at the box centre (odd size, unit sum).
        image: P ∗ S with the bad-plane pixels set to the image median first.
        variance: P² ∗ V_S.
        mask: the science mask with EDGE added outside the inner box.
        box: (x0, y0, width, height) of the inner box (science box shrunk by P's half width).
        n_interpolated: science pixels replaced by the median.
    """

    kernel: Kernel
    image: Image
    variance: Image
    mask: MaskImage
    box: Float[Array, "4"]
    n_interpolated: Array


def preconvolution_kernel(psf: Psf | None) -> Kernel:
    """P: the science PSF image at the box centre, normalised to unit sum; an even size raises `ValueError`.

    Arguments:
        psf: the science PSF.

    Returns:
        The (p, p) kernel, p odd.
    """
    if psf is None:
        raise ValueError("use_preconvolution needs a science PSF")
    image = psf.image()
    if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] % 2 == 0:
        raise ValueError(
            f"use_preconvolution needs an odd-sized square science PSF image, got shape {tuple(image.shape)}"
        )
    return image / jnp.sum(image)


def fill_bad(image: Image, mask: MaskImage, planes, bad_planes) -> tuple[Image, Array]:
    """Set pixels with a `bad_planes` bit (or non-finite) to the median of the others.

    Arguments:
        image: (ny, nx). mask: its bit mask. planes: the mask's plane table. bad_planes: plane names.

    Returns:
        (filled image, number of pixels replaced).
    """
    bad = ((mask & bitmask(planes, bad_planes)) != 0) | ~jnp.isfinite(image)
    med = quantile_masked(image, ~bad, 0.5)
    med = jnp.where(jnp.isfinite(med), med, 0.0).astype(image.dtype)
    return jnp.where(bad, med, image), jnp.sum(bad)


def preconvolve_science(
    image: Image, variance: Image, mask: MaskImage, xy0, out_planes, psf: Psf | None, cfg
) -> Preconvolved:
    """Matched science P ∗ S, its variance P² ∗ V and the inner box (ALGORITHM §12 steps 1–3).

    Arguments:
        image, variance: the science planes (variance already rescaled).
        mask: the prepared science mask in `out_planes`.
        xy0: science origin (x0, y0).
        out_planes: the output plane table (holds every `bad_mask_planes` plane).
        psf: the science PSF.
        cfg: the `SubtractConfig`.

    Returns:
        A `Preconvolved`.
    """
    kernel = preconvolution_kernel(psf).astype(image.dtype)
    hp = kernel.shape[0] // 2
    ny, nx = image.shape
    filled, n_interp = fill_bad(image, mask, out_planes, cfg.bad_mask_planes)
    var = jnp.where(jnp.isfinite(variance), variance, 0.0)
    matched = _convolve.convolve(filled, kernel)
    matched_var = _convolve.convolve(var, kernel * kernel)
    inner = np.zeros((ny, nx), bool)
    inner[hp : ny - hp, hp : nx - hp] = True
    edge_bit = plane_bit(out_planes, "EDGE")
    mask = jnp.where(inner, mask, mask | (1 << edge_bit))
    box = jnp.stack([xy0[0] + hp, xy0[1] + hp, nx - 2 * hp, ny - 2 * hp]).astype(solve_dtype())
    return Preconvolved(kernel, matched, matched_var, mask, box, n_interp)
