"""Subtraction with a given kernel (ip_diffim's `SimplifiedSubtractTask` with `useExistingKernel`).

The kernel comes from an earlier fit or another detector; only what is left is fitted on the whole overlap: the
differential background and, optionally, a flux scale s (the kernel becomes s·K). The convolution, difference,
decorrelation and metadata are the core's own stages, so with the kernel of a full fit and s fixed at 1 the
difference is the full fit's (the background only enters it when `do_subtract_background`).
"""

import equinox as eqx
import jax.numpy as jnp
from jax import lax

from . import convolve as _convolve
from . import spatial
from ._config import SubtractConfig, check_mode
from ._exposure import Exposure
from ._fit import pixel_fit_result
from ._image_fit import CLIP_PASSES, box_all, clip_mask, gram
from ._kernel import SpatialKernel
from ._mask import free_bits, plane_bit
from ._plan import Plan, psf_size_for
from ._prepare import exclusion_bits, output_planes
from ._sources import Sources, capacity_for
from ._stats import quantile_masked, usable
from ._subtract import Fitted, Prepared, Selection, core_inputs, difference, prepare, restore_wcs
from ._types import select, solve_dtype
from .solvers import condition_number, symmetric_solve


def fit_fixed_kernel(prep: Prepared, kernel: SpatialKernel, config: SubtractConfig, fit_flux_scale: bool):
    """The select and fit stages for a given kernel: background (and flux scale) on every usable pixel.

    Returns:
        (sel, fitted) for the core's `difference` stage: no stamps (`data` None), `fitted.kernel` = s·K,
        `fitted.extra` the flux scale and pixel counts.
    """
    cfg = config
    sdt = solve_dtype()
    science, template = prep.science, prep.template
    ny, nx = science.shape
    k = kernel.size
    h = k // 2
    planes = output_planes(science.mask_planes, template.mask_planes, cfg)
    excl = exclusion_bits(planes, cfg)
    is_t = prep.convolves_template
    x = select(is_t, prep.t_grown, prep.s_grown)
    y_img, y_var = select(is_t, (science.image, prep.var_s), (prep.t_box.image, prep.t_box.variance))
    box = kernel.box.astype(sdt)
    tx, ty = spatial.separable_terms(box, (ny + 2 * h, nx + 2 * h), science.xy0 - h, kernel.order, kernel.model)
    dt = x.image.dtype
    conv, conv_var, _ = _convolve.convolve_spatial(
        x.image,
        x.variance,
        x.mask,
        kernel.components().astype(dt),
        tx.astype(dt),
        ty.astype(dt),
        valid=x.inside,
        edge_bit=plane_bit(planes, "EDGE"),
        interior=h,
        spare_bits=free_bits(planes, 3),
    )
    x_ok = x.inside & ((x.mask & excl) == 0) & usable(x.image, x.variance)
    bad = ((prep.mask_s | prep.t_box.mask) & excl) != 0
    good0 = box_all(x_ok, k) & ~bad & prep.t_box.inside & usable(y_img, y_var) & jnp.isfinite(conv)
    bx, by = spatial.separable_terms(box, (ny, nx), science.xy0, cfg.spatial_bg_order, kernel.model)
    bg_terms = [by[m].astype(dt)[:, None] * bx[m].astype(dt)[None, :] for m in range(bx.shape[0])]
    conv0 = jnp.where(good0, conv, 0.0)
    y = jnp.where(good0, y_img, 0.0).astype(sdt)
    if not fit_flux_scale:
        y = y - conv0.astype(sdt)
    columns = jnp.stack(([conv0] if fit_flux_scale else []) + bg_terms)
    var = jnp.where(good0, y_var, 1.0).astype(sdt) + jnp.where(good0, conv_var, 0.0).astype(sdt)
    if cfg.constant_variance_weighting:
        med = quantile_masked(var, good0, 0.5)
        weight = jnp.ones_like(var) / jnp.where(med > 0, med, 1.0)
    else:
        weight = 1.0 / var

    def solve(good):
        G, v = gram(columns, jnp.where(good, weight, 0.0), y)
        return symmetric_solve(G, v), G

    def residual(theta):
        return (y - jnp.tensordot(theta.astype(dt), columns, axes=1).astype(sdt)) / jnp.sqrt(var)

    good = good0
    for _ in range(CLIP_PASSES - 1):
        good = clip_mask(good0, residual(solve(good)[0]))
    theta, G = solve(good)
    r = residual(lax.stop_gradient(theta))
    cnt = jnp.sum(good)
    mean = jnp.sum(jnp.where(good, r, 0.0)) / jnp.maximum(cnt, 1)
    std = jnp.sqrt(jnp.sum(jnp.where(good, (r - mean) ** 2, 0.0)) / jnp.maximum(cnt - 1, 1))
    scale = theta[0] if fit_flux_scale else jnp.ones((), sdt)
    bg = theta[1:] if fit_flux_scale else theta
    kernel = eqx.tree_at(lambda kk: kk.coefficients, kernel, kernel.coefficients * scale.astype(sdt))
    zero = jnp.zeros((), jnp.int32)
    fit = pixel_fit_result(
        theta,
        condition_number(lax.stop_gradient(G)),
        mean,
        std,
        kernel.coefficients[0, :1],
        CLIP_PASSES,
        (kernel.order, cfg.spatial_bg_order),
    )
    extra = dict(
        n_fit_pixels=cnt.astype(jnp.int32),
        n_clipped_pixels=jnp.sum(good0 & ~good).astype(jnp.int32),
        flux_scale=scale,
    )
    sel = Selection(None, kernel.basis, (), None, jnp.zeros(0, sdt), jnp.asarray(0), zero, zero)
    return sel, Fitted(fit, kernel, bg, extra)


@eqx.filter_jit
def _core_fixed(template, science, kernel, config, plan, fit_flux_scale, sources):
    prep = prepare(template, science, config, plan, sources)
    # the kernel's spatial terms mean what they meant when it was fitted: its own box, order and model
    prep = prep._replace(box=kernel.box.astype(prep.box.dtype))
    sel, fitted = fit_fixed_kernel(prep, kernel, config, fit_flux_scale)
    cfg = config.replace(spatial_kernel_order=kernel.order, spatial_model_type=kernel.model)
    return difference(prep, sel, fitted, cfg, plan)


def fixed_kernel_plan(template: Exposure, science: Exposure, kernel: SpatialKernel, config: SubtractConfig) -> Plan:
    """The core's static plan for a given kernel: its size, no stamps."""
    k = kernel.size
    if k % 2 == 0 or min(science.shape) <= 2 * k:
        raise ValueError(
            f"the given kernel is {k} px wide; it must be odd and the science image {science.shape} larger than "
            f"{2 * k} px on each side"
        )
    if config.use_preconvolution:
        raise ValueError("subtraction with a given kernel does not support use_preconvolution")
    check_mode(config.mode)
    psf_size = psf_size_for(template, science, config)
    return Plan(mode=config.mode, k=k, n_slots=1, capacity=1, psf_size=psf_size, fit_region="image")


def subtract_with_kernel(
    template: Exposure,
    science: Exposure,
    kernel: SpatialKernel,
    config: SubtractConfig | None = None,
    fit_flux_scale: bool = False,
    sources: Sources | None = None,
):
    """Subtract with a given PSF-matching kernel, fitting only the background (and optionally a flux scale).

    ip_diffim's `SimplifiedSubtractTask` with `useExistingKernel=True`: e.g. a kernel from an earlier fit of the
    same pair, or from another detector. Pure, jit- and vmap-friendly, differentiable like `jd.subtract`.

    Arguments:
        template, science: as `jd.subtract`.
        kernel: the `jd.SpatialKernel` to apply (to the template in convolveTemplate mode, to the science in
            convolveScience mode; `config.mode` must be the one it was fitted for). Its spatial terms are
            evaluated over its own box.
        config: a `SubtractConfig`; `mode`, the background order, masks, weighting and decorrelation apply.
        fit_flux_scale: also fit a factor s on the kernel (s·K); default False (s = 1).
        sources: known sources (parent coordinates), whose footprints the noise model keeps out of the variance
            estimates as `jd.subtract` does with its kernel sources (default: only the ones it detects itself).

    Returns:
        A `SubtractResult` like `jd.subtract`'s; `metadata` adds `flux_scale`, `n_fit_pixels` and
        `n_clipped_pixels`, and `psf_matching_kernel` is s·K.
    """
    config = SubtractConfig() if config is None else config
    plan = fixed_kernel_plan(template, science, kernel, config)
    capacity = None if sources is None else capacity_for(len(sources))
    t_in, s_in, src = core_inputs(template, science, sources, psf_size=plan.psf_size, capacity=capacity)
    return restore_wcs(_core_fixed(t_in, s_in, kernel, config, plan, fit_flux_scale, src), science.wcs)
