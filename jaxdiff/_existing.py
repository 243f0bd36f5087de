"""Subtraction with a given kernel (ip_diffim's `SimplifiedSubtractTask` with `useExistingKernel`).

The kernel comes from an earlier fit or another detector; only what is left is fitted on the whole overlap: the
differential background and, optionally, a flux scale s (the kernel becomes s·K). The convolution, difference,
decorrelation and metadata are the core's own stages, so with the kernel of a full fit and s fixed at 1 the
difference is the full fit's (the background only enters it when `do_subtract_background`).
"""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
from jax import lax

from . import convolve as _convolve
from . import spatial
from ._config import SubtractConfig
from ._exposure import Exposure
from ._fit import FitResult
from ._image_fit import CLIP_PASSES, box_all, clip_mask, gram
from ._kernel import SpatialKernel
from ._mask import plane_bit
from ._prepare import exclusion_bits, output_planes
from ._sources import Sources
from ._stats import quantile_masked, usable
from ._subtract import _stage_convolve, _stage_decorrelate, _stage_prepare, _strip_wcs, _with_wcs, make_plan
from ._threads import run_blocking
from ._types import solve_dtype
from .solvers import symmetric_solve


def stage_fixed_kernel(st: dict, kernel: SpatialKernel, config: SubtractConfig, plan, fit_flux_scale: bool) -> dict:
    """Replaces the select and fit stages: background (and flux scale) for a given kernel, on every usable pixel.

    Returns the state entries the convolve and decorrelate stages read (see `_image_fit.stage_fit_image`); the
    box is the kernel's, so that its spatial terms mean what they meant when it was fitted.
    """
    cfg = config
    sdt = solve_dtype()
    science, template = st["science"], st["template"]
    ny, nx = science.shape
    k = kernel.size
    h = k // 2
    planes = output_planes(science.mask_planes, template.mask_planes, cfg)
    excl = exclusion_bits(planes, cfg)
    if plan.mode == "convolveTemplate":
        x = (st["tg_img"], st["tg_var"], st["tg_mask"], st["tg_inside"])
        y_img, y_var = science.image, st["var_s"]
    else:
        x = (st["sg_img"], st["sg_var"], st["sg_mask"], st["sg_inside"])
        y_img, y_var = st["t_img"], st["t_var"]
    box = kernel.box.astype(sdt)
    tx, ty = spatial.separable_terms(box, (ny + 2 * h, nx + 2 * h), science.xy0 - h, kernel.order, kernel.model)
    dt = x[0].dtype
    conv, conv_var, _ = _convolve.convolve_spatial(
        x[0],
        x[1],
        x[2],
        kernel.components().astype(dt),
        tx.astype(dt),
        ty.astype(dt),
        valid=x[3],
        edge_bit=plane_bit(planes, "EDGE"),
        interior=h,
    )
    x_ok = x[3] & ((x[2] & excl) == 0) & usable(x[0], x[1])
    bad = ((st["mask_s"] | st["t_mask"]) & excl) != 0
    good0 = box_all(x_ok, k) & ~bad & st["t_inside"] & usable(y_img, y_var) & jnp.isfinite(conv)
    q_order = cfg.spatial_bg_order
    bx, by = spatial.separable_terms(box, (ny, nx), science.xy0, q_order, kernel.model)
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
    ev = jnp.linalg.eigvalsh(lax.stop_gradient(G))
    zero = jnp.zeros((), jnp.int32)
    kappa0 = kernel.coefficients[0, 0]
    fit = FitResult(
        theta=theta,
        condition_number=ev[-1] / ev[0],
        active=jnp.zeros((1,), bool),
        passed_single=jnp.zeros((1,), bool),
        n_iterations=jnp.asarray(CLIP_PASSES, jnp.int32),
        n_rejected_single=zero,
        n_rejected_ksum=zero,
        n_rejected_spatial=zero,
        residual_mean=mean,
        residual_std=std,
        stamp_kernel_sums=kappa0[None],
    )
    extra = dict(
        n_fit_pixels=cnt.astype(jnp.int32),
        n_clipped_pixels=jnp.sum(good0 & ~good).astype(jnp.int32),
        flux_scale=scale,
    )
    return dict(
        st,
        box=box,
        fit=fit,
        kernel=kernel,
        bg_coeffs=bg,
        kappa0=kappa0,
        theta=theta,
        n_stamps=zero,
        ok=jnp.zeros((1,), bool),
        image_fit_metadata=extra,
    )


@eqx.filter_jit
def _core_fixed(template, science, kernel, config, plan, fit_flux_scale):
    st = _stage_prepare(template, science, config, plan)
    st = stage_fixed_kernel(st, kernel, config, plan, fit_flux_scale)
    cfg = config.replace(spatial_kernel_order=kernel.order, spatial_model_type=kernel.model)
    st = _stage_convolve(st, cfg, plan)
    return _stage_decorrelate(st, cfg, plan)


def fixed_kernel_plan(template: Exposure, science: Exposure, kernel: SpatialKernel, config: SubtractConfig):
    """The core's static plan with the given kernel's size (the grown cut-outs depend on it)."""
    k = kernel.size
    if k % 2 == 0 or min(science.shape) <= 2 * k:
        raise ValueError(
            f"the given kernel is {k} px wide; it must be odd and the science image {science.shape} larger than "
            f"{2 * k} px on each side"
        )
    if config.use_preconvolution:
        raise ValueError("subtraction with a given kernel does not support use_preconvolution")
    empty = Sources(jnp.zeros(1), jnp.zeros(1), valid=jnp.zeros(1, bool))
    plan = make_plan(template, science, empty, config.replace(fit_region="image", scale_by_fwhm=False, kernel_size=k))
    return dataclasses.replace(plan, k=k, fit_region="image")


def subtract_with_kernel(
    template: Exposure,
    science: Exposure,
    kernel: SpatialKernel,
    config: SubtractConfig | None = None,
    fit_flux_scale: bool = False,
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

    Returns:
        A `SubtractResult` like `jd.subtract`'s; `metadata` adds `flux_scale`, `n_fit_pixels` and
        `n_clipped_pixels`, and `psf_matching_kernel` is s·K.
    """
    config = SubtractConfig() if config is None else config
    plan = fixed_kernel_plan(template, science, kernel, config)
    result = run_blocking(_core_fixed, _strip_wcs(template), _strip_wcs(science), kernel, config, plan, fit_flux_scale)
    return dataclasses.replace(
        result,
        difference=_with_wcs(result.difference, science.wcs),
        matched_template=_with_wcs(result.matched_template, science.wcs),
    )
