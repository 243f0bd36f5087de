"""Decorrelation of a difference image (`finalize`, ALGORITHM §11–12), shared by the core and the task."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import decorrelate as _decorrelate
from ._exposure import Exposure
from ._kernel import SpatialKernel
from ._mask import plane_bit
from ._psf import ImagePsf
from ._stats import _subsample, clipped_mean_std, standard_good
from ._types import select, solve_dtype

_LEVEL_SAMPLES = 2**16  # the variance planes are smooth: a regular subsample of 65k pixels fixes their level
_GRID = 4  # nodes of the spatially varying variant: centres of a 4 × 4 partition


def variance_level(variance, good):
    """Clipped mean of a variance plane over good pixels (the svar / tvar of ALGORITHM §11)."""
    mean, _, _ = clipped_mean_std(variance, good, max_samples=_LEVEL_SAMPLES)
    return mean


def variance_levels(planes, goods):
    """`variance_level` of each of several planes of one shape, with one copy of the clipping in the program
    (vmapped over their subsamples, which `clipped_mean_std` would take): the same values."""
    samples = [_subsample(v, g, _LEVEL_SAMPLES) for v, g in zip(planes, goods, strict=True)]
    values, keep = (jnp.stack(a) for a in zip(*samples, strict=True))
    return tuple(jax.vmap(lambda v, g: clipped_mean_std(v, g)[0])(values, keep))


def decorrelate_arrays(
    diff_img,
    diff_var,
    var_u,
    var_c,
    good_u,
    good_c,
    kernel: SpatialKernel,
    psf,
    *,
    science_matched: bool,
    preconv_kernel=None,
    spatially_varying: bool = False,
    excluded=None,
):
    """Decorrelate difference pixels on the science box.

    Arguments:
        diff_img, diff_var: the difference and its (undecorrelated) variance.
        var_u, var_c: unconvolved and convolved images' variance planes on the science box.
        good_u, good_c: pixels entering the clipped variance levels (standard exclusions).
        kernel: the matching kernel (its centre value is used; node values when spatially varying).
        psf: PSF of the undecorrelated difference, or None.
        science_matched: True when the science was convolved (weights ÷ κ₀²); a traced bool under `mode="auto"`.
        preconv_kernel: the preconvolution kernel P for score images, or None.
        spatially_varying: use the 4 × 4-node variant.
        excluded: boolean (ny, nx) of pixels kept out of the filter like non-finite ones (set to the mean
            first, their undecorrelated image and variance restored after), or None. Pass the EDGE pixels:
            jaxdiff's edge band holds the unconvolved input (LSST's holds NaN), and under preconvolution the
            ring outside the inner box holds P ∗ S minus the unconvolved template; filtering them smeared star
            mismatches of up to 20 into good pixels (§15 #17, template σ 2.0: score std 0.113 vs 0.050).

    Returns:
        (image, variance, psf) of the decorrelated difference; the PSF is P ∗ c renormalised.
    """
    v_u, v_c = variance_levels((var_u, var_c), (good_u, good_c))
    k0 = kernel.coefficients[0, 0]
    kept = jnp.isfinite(diff_img) if excluded is None else jnp.isfinite(diff_img) & ~excluded
    diff_in = jnp.where(kept, diff_img, jnp.nan)
    # The filter needs only the kernel, so XLA would build its grid-sized arrays as soon as the fit ends and
    # hold them through the convolution: tie the kernel to the difference (peak memory, not results).
    kernel, diff_in = lax.optimization_barrier((kernel, diff_in))
    if spatially_varying:
        ny, nx = diff_img.shape
        ry = np.linspace(0, ny, _GRID + 1).round().astype(int)
        rx = np.linspace(0, nx, _GRID + 1).round().astype(int)
        node_y = 0.5 * (ry[:-1] + ry[1:] - 1)
        node_x = 0.5 * (rx[:-1] + rx[1:] - 1)
        x0, y0 = kernel.box[0], kernel.box[1]
        kernels = jnp.stack(
            [jnp.stack([kernel.image(x0 + node_x[i], y0 + node_y[j]) for i in range(_GRID)]) for j in range(_GRID)]
        )

        def cell_levels(plane, good):
            return jnp.stack(
                [
                    jnp.stack(
                        [
                            variance_level(
                                plane[ry[j] : ry[j + 1], rx[i] : rx[i + 1]], good[ry[j] : ry[j + 1], rx[i] : rx[i + 1]]
                            )
                            for i in range(_GRID)
                        ]
                    )
                    for j in range(_GRID)
                ]
            )

        vu, vc = cell_levels(var_u, good_u), cell_levels(var_c, good_c)
        img, var, c_img = _decorrelate.decorrelate_spatial(
            diff_in,
            var_u,
            var_c,
            kernels,
            vu,
            vc,
            jnp.asarray(node_x),
            jnp.asarray(node_y),
            preconv_kernel=preconv_kernel,
        )
        # one PSF for the whole difference: the filter at the box centre, i.e. the mean of the 4 central nodes
        c_img = jnp.mean(c_img[_GRID // 2 - 1 : _GRID // 2 + 1, _GRID // 2 - 1 : _GRID // 2 + 1], axis=(0, 1))
    else:
        img, var, c_img = _decorrelate.decorrelate(
            diff_in, var_u, var_c, kernel.image(), v_u, v_c, preconv_kernel=preconv_kernel
        )
    var = var / select(science_matched, k0**2, jnp.ones_like(k0))
    var = jnp.where(kept, var, diff_var).astype(diff_var.dtype)
    img = jnp.where(kept, img, diff_img).astype(diff_img.dtype)
    if psf is not None and preconv_kernel is None:
        psf = ImagePsf(_decorrelate.difference_psf(psf.image().astype(solve_dtype()), c_img.astype(solve_dtype())))
    return img, var, psf, v_u, v_c


def edge_pixels(mask, planes):
    """EDGE pixels of a mask (all False when the table has no EDGE plane)."""
    bit = plane_bit(planes, "EDGE")
    return jnp.zeros(mask.shape, bool) if bit is None else (mask & (1 << bit)) != 0


def _cut_to(template: Exposure, science: Exposure, plane):
    sx0, sy0, _, _ = science.bbox
    tx0, ty0, _, _ = template.bbox
    ny, nx = science.shape
    return plane[sy0 - ty0 : sy0 - ty0 + ny, sx0 - tx0 : sx0 - tx0 + nx]


def finalize(
    template: Exposure,
    science: Exposure,
    difference: Exposure,
    kernel: SpatialKernel,
    *,
    template_matched: bool = True,
    preconv_mode: bool = False,
    preconv_kernel=None,
    spatially_varying: bool = False,
) -> Exposure:
    """Decorrelate `difference` given the two inputs and the matching kernel (eager entry point)."""
    if preconv_mode and preconv_kernel is None:
        preconv_kernel = science.psf.image() if science.psf is not None else None
        if preconv_kernel is None:
            raise ValueError("preconv_mode needs preconv_kernel or a science PSF")
    if preconv_kernel is not None:
        preconv_kernel = jnp.asarray(preconv_kernel)
        if preconv_kernel.shape[0] % 2 == 0 or preconv_kernel.shape[0] != preconv_kernel.shape[1]:
            raise ValueError(f"preconv_kernel must be square and odd-sized, got shape {tuple(preconv_kernel.shape)}")
    t_var = _cut_to(template, science, template.variance)
    t_img = _cut_to(template, science, template.image)
    t_mask = _cut_to(template, science, template.mask)
    good_s = standard_good(science.image, science.variance, science.mask, science.mask_planes)
    good_t = standard_good(t_img, t_var, t_mask, template.mask_planes)
    if template_matched:
        args = (science.variance, t_var, good_s, good_t)
    else:
        args = (t_var, science.variance, good_t, good_s)
    img, var, psf, _, _ = decorrelate_arrays(
        difference.image,
        difference.variance,
        *args,
        kernel,
        difference.psf,
        science_matched=not template_matched,
        preconv_kernel=preconv_kernel if preconv_mode else None,
        spatially_varying=spatially_varying,
        excluded=edge_pixels(difference.mask, difference.mask_planes),
    )
    return Exposure(
        img,
        var,
        difference.mask,
        psf,
        difference.xy0,
        difference.photo_calib,
        difference.wcs,
        difference.mask_planes,
    )
