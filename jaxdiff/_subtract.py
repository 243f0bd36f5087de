"""`subtract`: the pure, jit-compiled Alard–Lupton subtraction (ALGORITHM §3–§11)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import basis as _basis
from . import convolve as _convolve
from . import spatial
from . import stamps as _stamps
from ._background import BackgroundModel
from ._config import SubtractConfig, check_mode
from ._errors import RESULTS
from ._exposure import Exposure
from ._fit import StampData, fit_kernel
from ._kernel import SpatialKernel
from ._mask import bitmask, plane_bit
from ._noise import exposure_source_free
from ._preconvolve import fill_bad, preconvolution_kernel, preconvolve_science
from ._prepare import (
    exclusion_bits,
    output_planes,
    padded_cut,
    prepare_science_mask,
    prepare_template_mask,
)
from ._psf import Psf
from ._result import SubtractResult
from ._sources import Sources
from ._stats import clipped_mean_std, quantile_masked, standard_good, usable, variance_factor
from ._threads import run_blocking
from ._types import is_concrete, solve_dtype

_RESCALE_EXCLUDE = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP")
# |pixel| at or above this is a fill sentinel (SExtractor/IRAF use ±1e30), not data: treated like NaN, since a
# finite 1e30 would leak through the FFT convolution and decorrelation into every output pixel
_MAX_PIXEL = 1e20


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static decisions taken before tracing: they fix every shape of the compiled program."""

    mode: str  # resolved: "convolveTemplate" or "convolveScience"
    k: int  # kernel side
    n_slots: int  # stamp capacity
    basis_mode: str  # "config", "convolution", "deconvolution" (informational)
    rank_by_snr: bool = True  # some valid source lacks a flux: rank by measured S/N
    basis_sigmas: tuple[float, ...] = ()  # Alard–Lupton widths from the concrete PSF widths (metadata only)


@eqx.filter_jit
def _sigma_xy(psf: Psf):
    # compiled once per PSF type and size: eager adaptive moments dispatch ~40 iterations op by op (85 ms)
    return psf.sigma_xy()


def psf_widths(psf: Psf | None):
    """(sigma_x, sigma_y) as Python floats, or None when there is no PSF or it is traced."""
    if psf is None:
        return None
    leaves = jax.tree.leaves(psf)
    if not is_concrete(leaves):
        return None
    sx, sy = jax.device_get(_sigma_xy(psf))
    if not (np.isfinite(sx) and np.isfinite(sy)):
        raise ValueError("the PSF width cannot be measured at the image centre (adaptive moments failed)")
    return float(sx), float(sy)


def resolve_mode(mode: str, w_template, w_science) -> str:
    """`auto` → convolve the template iff FWHM_x(T) ≤ FWHM_x(S) or FWHM_y(T) ≤ FWHM_y(S)."""
    check_mode(mode)
    if mode != "auto":
        return mode
    if w_template is None or w_science is None:
        return "convolveTemplate"
    (tx, ty), (sx, sy) = w_template, w_science
    return "convolveTemplate" if (tx <= sx or ty <= sy) else "convolveScience"


def make_plan(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig) -> Plan:
    """The static plan: resolved mode, kernel size, stamp capacity (ALGORITHM §2)."""
    wt, ws = psf_widths(template.psf), psf_widths(science.psf)
    mode = resolve_mode(config.mode, wt, ws)
    if config.use_preconvolution:
        mode = "convolveTemplate"
        preconvolution_kernel(science.psf)  # raises on an even PSF
        if ws is not None:
            ws = (ws[0] * np.sqrt(2.0), ws[1] * np.sqrt(2.0))  # fit FWHM_T → √2·FWHM_S (§12)
    k = config.kernel_size
    basis_mode = "config"
    basis_sigmas = tuple(float(v) for v in config.al_sig_gauss) if config.kernel_basis == "alard-lupton" else ()
    if config.kernel_basis == "alard-lupton" and wt is not None and ws is not None:
        sx = float(np.sqrt(0.5 * (wt[0] ** 2 + wt[1] ** 2)))
        ss = float(np.sqrt(0.5 * (ws[0] ** 2 + ws[1] ** 2)))
        sig_x, sig_y = (sx, ss) if mode == "convolveTemplate" else (ss, sx)
        widths, basis_mode = _basis.alard_lupton_widths(sig_x, sig_y, **_width_kwargs(config))
        basis_sigmas = tuple(float(v) for v in np.asarray(widths))
        if config.scale_by_fwhm:
            k = _basis.kernel_size(
                np.asarray(widths),
                fwhm_scaling=config.kernel_size_fwhm_scaling,
                size_min=config.kernel_size_min,
                size_max=config.kernel_size_max,
            )
    side = 2 * int(k) + 1
    if side > min(science.shape):
        raise ValueError(
            f"kernel size {int(k)} needs ({side}, {side}) stamps, larger than the science image {science.shape}; "
            "use a smaller kernel_size / kernel_size_max or a larger image"
        )
    n_src = len(sources)
    n_slots = n_src if config.max_kernel_sources < 0 else min(config.max_kernel_sources, n_src)
    rank_by_snr = True
    if is_concrete((sources.flux, sources.valid)):
        flux, valid = np.asarray(sources.flux), np.asarray(sources.valid)
        rank_by_snr = not bool(np.all(np.isfinite(flux[valid])))
    return Plan(
        mode=mode,
        k=int(k),
        n_slots=max(int(n_slots), 1),
        basis_mode=basis_mode,
        rank_by_snr=rank_by_snr,
        basis_sigmas=basis_sigmas,
    )


def _width_kwargs(config):
    return dict(
        sig_gauss=tuple(config.al_sig_gauss),
        beta=config.al_gauss_beta,
        min_sig=config.al_min_sig,
        min_sig_deconv=config.al_min_sig_deconv,
        scale_by_fwhm=config.scale_by_fwhm,
    )


def _strip_wcs(exposure: Exposure) -> Exposure:
    new = object.__new__(Exposure)
    for f in dataclasses.fields(exposure):
        object.__setattr__(new, f.name, getattr(exposure, f.name))
    object.__setattr__(new, "wcs", None)
    return new


def _with_wcs(exposure: Exposure, wcs) -> Exposure:
    new = _strip_wcs(exposure)
    object.__setattr__(new, "wcs", wcs)
    return new


def subtract(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig | None = None):
    """PSF-match, subtract and (unless configured off) decorrelate: the pure function behind the task.

    Arguments:
        template: the reference exposure; its box must contain the science box.
        science: the new exposure; outputs live on its box.
        sources: candidate kernel stars (parent coordinates).
        config: a `SubtractConfig` (default: LSST's defaults).

    Returns:
        A `SubtractResult` whose `metadata` holds 0-d arrays (status code, counts, kernel sum, residual
        statistics, condition number, coverage, variance factors). Never raises on data: `status`
        (a `jd.RESULTS` code) says what failed.
    """
    config = SubtractConfig() if config is None else config
    plan = make_plan(template, science, sources, config)
    result = run_blocking(_core, _strip_wcs(template), _strip_wcs(science), sources, config, plan)
    return dataclasses.replace(
        result,
        difference=_with_wcs(result.difference, science.wcs),
        matched_template=_with_wcs(result.matched_template, science.wcs),
    )


def subtract_staged(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig, plan: Plan, clock):
    """`subtract` run stage by stage, each stage jitted on its own and timed with `block_until_ready`.

    Arguments:
        plan: the static plan from `make_plan` for these inputs (the caller already built it for its checks).
        clock: a callable returning seconds (e.g. `time.perf_counter`).

    Returns:
        (result, timings): the same result as `subtract` (a test checks they agree) and the wall time of
        each stage in `STAGES`, compilation included on a first call.
    """
    t_in, s_in = _strip_wcs(template), _strip_wcs(science)
    timings = {}

    def timed(name, fn, *args):
        t0 = clock()
        out = run_blocking(fn, *args, config, plan)  # compiles ahead and trims on a first call, then blocks
        timings[name] = clock() - t0
        return out

    st = timed("prepare", _jit_prepare, t_in, s_in, sources)
    st = {**st, **timed("select", _jit_select, st, sources)}
    st = {**st, **timed("fit", _jit_fit, st)}
    st = {**st, **timed("convolve", _jit_convolve, st)}
    result = timed("decorrelate", _jit_decorrelate, st)
    result = dataclasses.replace(
        result,
        difference=_with_wcs(result.difference, science.wcs),
        matched_template=_with_wcs(result.matched_template, science.wcs),
    )
    return result, timings


@eqx.filter_jit
def _core(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig, plan: Plan):
    return core(template, science, sources, config, plan)


def _roles(st: dict, plan: Plan):
    """The convolved image X (grown cut-out planes), the matched image Y and their PSFs for the mode."""
    if plan.mode == "convolveTemplate":
        xg = (st["tg_img"], st["tg_var"], st["tg_mask"], st["tg_inside"])
        return xg, st["science"].image, st["var_s"], st["template"].psf, st["science"].psf
    xg = (st["sg_img"], st["sg_var"], st["sg_mask"], st["sg_inside"])
    return xg, st["t_img"], st["t_var"], st["science"].psf, st["template"].psf


STAGES = ("prepare", "select", "fit", "convolve", "decorrelate")


def core(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig, plan: Plan):
    """The traceable subtraction for a fixed plan (not jitted: callers jit or vmap it)."""
    st = _stage_prepare(template, science, sources, config, plan)
    st = _stage_select(st, sources, config, plan)
    st = _stage_fit(st, config, plan)
    st = _stage_convolve(st, config, plan)
    return _stage_decorrelate(st, config, plan)


def _frame(template: Exposure, science: Exposure, config: SubtractConfig, plan: Plan):
    """(k, h, ny, nx, output plane table): the static geometry every stage starts from."""
    ny, nx = science.shape
    return plan.k, plan.k // 2, ny, nx, output_planes(science.mask_planes, template.mask_planes, config)


def _stage_prepare(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig, plan: Plan) -> dict:
    """Variance rescaling, masks, cut-outs and coverage (ALGORITHM §1, §3, §4)."""
    cfg = config
    k, h, ny, nx, out_planes = _frame(template, science, cfg, plan)
    sdt = solve_dtype()
    nodata_bit = plane_bit(out_planes, "NO_DATA")
    crop = (slice(h, h + ny), slice(h, h + nx))
    box = jnp.stack([science.xy0[0], science.xy0[1], nx, ny]).astype(sdt)
    var_s_raw = None
    template, science = _sentinels_to_nan(template), _sentinels_to_nan(science)

    # --- variance rescaling (§4.1), outside source footprints whatever the masks say (_noise) ---
    def rescale(e: Exposure):
        bad = bitmask(e.mask_planes, _RESCALE_EXCLUDE)
        good, _ = exposure_source_free(e, (e.mask & bad) == 0, sources)
        if not cfg.do_scale_variance:
            return e.variance, jnp.ones((), sdt), jnp.zeros((), bool), good, jnp.zeros((), jnp.int32)
        f, r_est, l_est, n_used = variance_factor(e.image, e.variance, good, always_level=False)
        fail = (r_est > 10) & (l_est > 10)
        return e.variance * f.astype(e.variance.dtype), f.astype(sdt), fail, good, n_used.astype(jnp.int32)

    var_t, factor_t, fail_t, free_t, n_var_t = rescale(template)
    var_s, factor_s, fail_s, free_s, n_var_s = rescale(science)

    # --- masks (§4.2) and template cut-out on the science box grown by h (§1) ---
    mask_s = prepare_science_mask(science.mask, science.mask_planes, out_planes)
    mask_t = prepare_template_mask(template.mask, template.mask_planes, out_planes, cfg)
    if nodata_bit is not None:  # non-finite pixels carry no data: flag them so they are excluded and masked
        nd = jnp.asarray(1 << nodata_bit, mask_s.dtype)
        mask_s = mask_s | jnp.where(jnp.isfinite(science.image) & jnp.isfinite(var_s), 0, nd)
        mask_t = mask_t | jnp.where(jnp.isfinite(template.image) & jnp.isfinite(var_t), 0, nd)
    pre = None
    if cfg.use_preconvolution:  # score image (§12): fit T to P ∗ S over the inner box
        pre = preconvolve_science(science.image, var_s, mask_s, science.xy0, out_planes, science.psf, cfg)
        var_s_raw = var_s
        t_filled, _ = fill_bad(template.image, template.mask, template.mask_planes, cfg.bad_mask_planes)
        template = dataclasses.replace(template, image=t_filled)
        science = dataclasses.replace(science, image=pre.image)
        var_s, mask_s, box = pre.variance, pre.mask, pre.box
    offset = jnp.stack([science.xy0[1] - template.xy0[1], science.xy0[0] - template.xy0[0]])
    inside_t_full = jnp.ones(template.shape, bool)
    tg_img, tg_var, tg_mask, tg_inside = padded_cut(
        (template.image, var_t, mask_t, inside_t_full), offset, h, (ny, nx), (0.0, 1.0, 0, False)
    )
    sg_img, sg_var, sg_mask, sg_inside = padded_cut(
        (science.image, var_s, mask_s, jnp.ones((ny, nx), bool)),
        jnp.zeros(2, jnp.int32),
        h,
        (ny, nx),
        (0.0, 1.0, 0, False),
    )
    crop = (slice(h, h + ny), slice(h, h + nx))
    t_img, t_var, t_mask, t_inside = tg_img[crop], tg_var[crop], tg_mask[crop], tg_inside[crop]
    free_t = lax.dynamic_slice(free_t, (offset[0], offset[1]), (ny, nx))  # the source-free template pixels

    # --- coverage (§3) ---
    nodata_val = 0 if nodata_bit is None else (1 << nodata_bit)
    lacks = ((t_mask | mask_s) & nodata_val) != 0
    coverage = 1.0 - jnp.sum(lacks, dtype=jnp.int32).astype(sdt) / lacks.size

    st = {}
    return dict(
        st,
        var_t=var_t,
        factor_t=factor_t,
        fail_t=fail_t,
        var_s=var_s,
        factor_s=factor_s,
        fail_s=fail_s,
        free_s=free_s,
        free_t=free_t,
        n_var_s=n_var_s,
        n_var_t=n_var_t,
        mask_s=mask_s,
        mask_t=mask_t,
        pre=pre,
        var_s_raw=var_s_raw,
        template=template,
        science=science,
        box=box,
        tg_img=tg_img,
        tg_var=tg_var,
        tg_mask=tg_mask,
        tg_inside=tg_inside,
        sg_img=sg_img,
        sg_var=sg_var,
        sg_mask=sg_mask,
        sg_inside=sg_inside,
        t_img=t_img,
        t_var=t_var,
        t_mask=t_mask,
        t_inside=t_inside,
        coverage=coverage,
    )


def _stage_select(st: dict, sources: Sources, config: SubtractConfig, plan: Plan) -> dict:
    """Kernel basis and stamp selection (ALGORITHM §5, §6)."""
    science = st["science"]
    template = st["template"]
    cfg = config
    k, h, ny, nx, out_planes = _frame(template, science, cfg, plan)
    sdt = solve_dtype()
    var_s = st["var_s"]
    mask_s = st["mask_s"]
    t_mask = st["t_mask"]
    t_img = st["t_img"]
    t_var = st["t_var"]
    t_inside = st["t_inside"]
    box = st["box"]
    pre = st["pre"]
    xg, y_img, y_var, psf_x, psf_y = _roles(st, plan)

    # --- basis (§5) ---
    if cfg.kernel_basis == "alard-lupton":
        if psf_x is None or psf_y is None:
            sig_x = sig_y = None
        else:
            sig_x, sig_y = psf_x.sigma(), psf_y.sigma()
            if pre is not None:
                sig_y = sig_y * np.sqrt(2.0)
        widths, _ = _basis.alard_lupton_widths_traced(sig_x, sig_y, **_width_kwargs(cfg))
        fx, fy, mix = _basis.alard_lupton_factors(k, widths, tuple(cfg.al_deg_gauss), cfg.orthonormalize_basis)
        basis_images = jnp.einsum("br,rv,ru->bvu", mix, fy, fx)
    else:
        basis_images = _basis.delta_function(k).astype(sdt)
        eye = jnp.eye(k, dtype=sdt)
        fx = jnp.tile(eye, (k, 1))
        fy = jnp.repeat(eye, k, axis=0)
        mix = basis_images.reshape(basis_images.shape[0], -1)
    n = basis_images.shape[0]
    reg = None
    if cfg.kernel_basis == "delta-function" and cfg.use_regularization:
        H = _basis.regularization_matrix(
            k, basis_images, lambda_value=cfg.lambda_value, border_penalty=cfg.regularization_border_penalty
        )
        reg = jnp.zeros((n + 1, n + 1), sdt).at[:n, :n].set(H)

    # --- stamps (§6) ---
    excl = exclusion_bits(out_planes, cfg)
    bad = ((mask_s | t_mask) & excl) != 0
    bad = bad | ~usable(science.image, var_s) | ~usable(t_img, t_var) | ~t_inside
    cx, cy = _stamps.centres(sources.x, sources.y, science.xy0)
    margin = (k if cfg.restrict_kernel_edge_sources else 0) + (k if pre is not None else 0)
    ok = _stamps.usable_candidates(cx, cy, sources.valid, bad, k, margin)
    ok = ok & ~_repeated(cx, cy, ok, nx)  # a duplicated source must not count its stamp twice
    side = 2 * k + 1
    if plan.rank_by_snr:
        score = jnp.where(jnp.isfinite(sources.flux), sources.flux, _snr(science.image, var_s, cy, cx, k))
    else:
        score = sources.flux
    index, slot_valid = _stamps.rank_and_pack(score, ok, plan.n_slots)
    scx, scy = cx[index], cy[index]
    r0, c0 = scy - k, scx - k
    x_img, x_var = xg[0], xg[1]
    x_stamp = _stamps.extract(x_img, r0 + h, c0 + h, side)
    vx_stamp = _stamps.extract(x_var, r0 + h, c0 + h, side)
    y_stamp = _stamps.extract(y_img, r0, c0, side)
    vy_stamp = _stamps.extract(y_var, r0, c0, side)
    core_sl = (slice(None), slice(h, side - h), slice(h, side - h))
    good_core = _stamps.extract(~bad, r0, c0, side)[core_sl]
    finite = slot_valid[:, None, None]
    x_stamp = jnp.where(finite & jnp.isfinite(x_stamp), x_stamp, 0.0).astype(sdt)
    vx_stamp = jnp.where(finite & jnp.isfinite(vx_stamp), vx_stamp, 1.0).astype(sdt)
    y_core = jnp.where(finite & jnp.isfinite(y_stamp), y_stamp, 0.0).astype(sdt)[core_sl]
    vy_core = jnp.where(finite & jnp.isfinite(vy_stamp), vy_stamp, 1.0).astype(sdt)[core_sl]
    if cfg.constant_variance_weighting:
        total = (vx_stamp + jnp.where(finite, vy_stamp, 1.0)).reshape(len(index), -1)
        med = jax.vmap(lambda v: quantile_masked(v, jnp.ones(v.shape, bool), 0.5))(total)
        weight = jnp.where(med > 0, 1.0 / jnp.where(med > 0, med, 1.0), 1.0)
    else:
        weight = None
    sx_pos = sources.x[index].astype(sdt)
    sy_pos = sources.y[index].astype(sdt)
    P_order, Q_order = cfg.spatial_kernel_order, cfg.spatial_bg_order
    p = spatial.terms(sx_pos, sy_pos, box, P_order, cfg.spatial_model_type).T
    q = spatial.terms(sx_pos, sy_pos, box, Q_order, cfg.spatial_model_type).T
    data = StampData(
        x_stamp=x_stamp,
        vx_stamp=vx_stamp,
        y_core=y_core,
        vy_core=vy_core,
        good_core=good_core & slot_valid[:, None, None],
        weight=weight if weight is not None else 1.0 / (vx_stamp[core_sl] + vy_core),
        p=p,
        q=q,
        cx=scx,
        cy=scy,
        valid=slot_valid,
    )
    n_stamps = jnp.sum(slot_valid)

    return dict(st, data=data, basis_images=basis_images, fx=fx, fy=fy, mix=mix, reg=reg, n_stamps=n_stamps, ok=ok)


def _stage_fit(st: dict, config: SubtractConfig, plan: Plan) -> dict:
    """Per-stamp fits, rejection loop and the global spatial solve (ALGORITHM §7, §8)."""
    cfg = config
    sdt = solve_dtype()
    data = st["data"]
    basis_images = st["basis_images"]
    fx = st["fx"]
    fy = st["fy"]
    mix = st["mix"]
    reg = st["reg"]
    box = st["box"]
    n = basis_images.shape[0]
    P_order, Q_order = cfg.spatial_kernel_order, cfg.spatial_bg_order
    # --- fit (§7, §8) ---
    k = basis_images.shape[-1]
    if cfg.kernel_basis == "alard-lupton":
        groups = _basis.x_factor_groups(tuple(cfg.al_deg_gauss))
    else:  # delta functions: raw image r has column factor eye[r % k]
        groups = (tuple(range(k)), tuple(r % k for r in range(k * k)))
    fit = fit_kernel(data, basis_images, (fx, fy, mix, groups), cfg.solver, cfg, reg)
    theta = fit.theta
    P = spatial.n_terms(P_order)
    spatial.n_terms(Q_order)
    coeffs = jnp.zeros((n, P), sdt).at[0, 0].set(theta[0]).at[1:, :].set(theta[1 : 1 + (n - 1) * P].reshape(n - 1, P))
    bg_coeffs = theta[1 + (n - 1) * P :]
    kernel = SpatialKernel(basis_images, coeffs, box, P_order, cfg.spatial_model_type)
    kappa0 = theta[0]

    return dict(st, fit=fit, kernel=kernel, bg_coeffs=bg_coeffs, kappa0=kappa0, theta=theta)


def _stage_convolve(st: dict, config: SubtractConfig, plan: Plan) -> dict:
    """Apply the spatially varying kernel and form the difference (ALGORITHM §9, §10)."""
    science = st["science"]
    template = st["template"]
    cfg = config
    k, h, ny, nx, out_planes = _frame(template, science, cfg, plan)
    edge_bit = plane_bit(out_planes, "EDGE")
    var_s = st["var_s"]
    mask_s = st["mask_s"]
    t_img = st["t_img"]
    t_var = st["t_var"]
    t_mask = st["t_mask"]
    box = st["box"]
    pre = st["pre"]
    var_s_raw = st["var_s_raw"]
    kernel = st["kernel"]
    bg_coeffs = st["bg_coeffs"]
    kappa0 = st["kappa0"]
    xg, y_img, y_var, psf_x, psf_y = _roles(st, plan)

    P_order, Q_order = cfg.spatial_kernel_order, cfg.spatial_bg_order
    # --- apply the kernel (§9) ---
    x_img, x_var = xg[0], xg[1]
    img_dtype = x_img.dtype
    kernels = kernel.components().astype(img_dtype)
    xy0_g = science.xy0 - h
    tx, ty = spatial.separable_terms(box, (ny + 2 * h, nx + 2 * h), xy0_g, P_order, cfg.spatial_model_type)
    x_good = usable(x_img, x_var) & xg[3]
    stride = max(1, int(np.ceil(np.sqrt(x_img.size / 2**16))))  # the level only needs ~6e4 samples
    x_med = quantile_masked(x_img[::stride, ::stride], x_good[::stride, ::stride], 0.5)
    x_med = lax.stop_gradient(jnp.where(jnp.isfinite(x_med), x_med, 0.0))
    preserve = bitmask(out_planes, cfg.preserve_mask_planes)
    conv_img, conv_var, conv_mask = _convolve.convolve_spatial(
        x_img,
        x_var,
        xg[2],
        kernels,
        tx.astype(img_dtype),
        ty.astype(img_dtype),
        valid=xg[3],
        edge_bit=edge_bit,
        preserve_bits=preserve,
        offset=x_med.astype(img_dtype),
        interior=h,
    )

    # --- difference (§10) ---
    background = BackgroundModel(bg_coeffs, box, Q_order, cfg.spatial_model_type)
    bg_img = background.image((ny, nx), science.xy0, dtype=img_dtype)
    bg_sub = bg_img if cfg.do_subtract_background else jnp.zeros_like(bg_img)
    k0 = kappa0.astype(img_dtype)
    if plan.mode == "convolveTemplate":
        diff_img = science.image - conv_img - bg_sub
        diff_var = var_s + conv_var
        diff_mask = mask_s | conv_mask
        matched = Exposure(
            conv_img,
            conv_var,
            conv_mask,
            science.psf,
            science.xy0,
            template.photo_calib,
            mask_planes=out_planes,
        )
        bg_model = background
        psf_diff = science.psf
        v_u_plane, v_c_plane = (var_s if pre is None else var_s_raw), t_var
    else:
        diff_img = (conv_img - t_img + bg_sub) / k0
        diff_var = (conv_var + t_var) / k0**2
        diff_mask = conv_mask | t_mask
        matched = Exposure(
            t_img / k0,
            t_var / k0**2,
            t_mask,
            template.psf,
            science.xy0,
            template.photo_calib,
            mask_planes=out_planes,
        )
        bg_model = BackgroundModel(-bg_coeffs / kappa0, box, Q_order, cfg.spatial_model_type)
        psf_diff = template.psf
        v_u_plane, v_c_plane = t_var, var_s

    return dict(
        st,
        diff_img=diff_img,
        diff_var=diff_var,
        diff_mask=diff_mask,
        matched=matched,
        bg_model=bg_model,
        psf_diff=psf_diff,
        v_u_plane=v_u_plane,
        v_c_plane=v_c_plane,
    )


def _stage_decorrelate(st: dict, config: SubtractConfig, plan: Plan) -> SubtractResult:
    """Decorrelate the difference and assemble the result (ALGORITHM §11, §13)."""
    science = st["science"]
    template = st["template"]
    cfg = config
    _, _, ny, nx, out_planes = _frame(template, science, cfg, plan)
    var_s = st["var_s"]
    t_img = st["t_img"]
    t_var = st["t_var"]
    pre = st["pre"]
    kernel = st["kernel"]
    diff_img = st["diff_img"]
    diff_var = st["diff_var"]
    diff_mask = st["diff_mask"]
    matched = st["matched"]
    bg_model = st["bg_model"]
    psf_diff = st["psf_diff"]
    v_u_plane = st["v_u_plane"]
    v_c_plane = st["v_c_plane"]
    fit = st["fit"]
    theta = st["theta"]
    kappa0 = st["kappa0"]
    n_stamps = st["n_stamps"]
    ok = st["ok"]
    coverage = st["coverage"]
    factor_s = st["factor_s"]
    factor_t = st["factor_t"]
    fail_s = st["fail_s"]
    fail_t = st["fail_t"]
    tg_img = st["tg_img"]
    img_dtype = tg_img.dtype
    # --- decorrelation (§11) ---
    good_s = standard_good(science.image, var_s, diff_mask, out_planes) & st["free_s"]  # no source footprints
    good_t = standard_good(t_img, t_var, diff_mask, out_planes) & st["free_t"]
    good_u, good_c = (good_s, good_t) if plan.mode == "convolveTemplate" else (good_t, good_s)
    if cfg.do_decorrelation:
        from ._finalize import decorrelate_arrays, edge_pixels

        d_img, d_var, psf_diff, v_u, v_c = decorrelate_arrays(
            diff_img,
            diff_var,
            v_u_plane,
            v_c_plane,
            good_u,
            good_c,
            kernel,
            psf_diff,
            science_matched=plan.mode == "convolveScience",
            preconv_kernel=None if pre is None else pre.kernel,
            excluded=edge_pixels(diff_mask, out_planes),
        )
    else:
        d_img, d_var = diff_img, diff_var
        v_u = clipped_mean_std(v_u_plane, good_u, max_samples=2**16)[0]
        v_c = clipped_mean_std(v_c_plane, good_c, max_samples=2**16)[0]
    svar, tvar = (v_u, v_c) if plan.mode == "convolveTemplate" else (v_c, v_u)
    difference = Exposure(
        d_img.astype(img_dtype),
        d_var.astype(img_dtype),
        diff_mask,
        psf_diff,
        science.xy0,
        science.photo_calib,
        mask_planes=out_planes,
    )

    status = jnp.where(
        n_stamps < cfg.min_kernel_sources,
        RESULTS.insufficient_sources,
        jnp.where(
            jnp.sum(fit.active) == 0,
            RESULTS.no_candidates,
            jnp.where(jnp.all(jnp.isfinite(theta)), RESULTS.successful, RESULTS.nonfinite_solution),
        ),
    ).astype(jnp.int32)
    metadata = dict(
        status=status,
        n_candidates=jnp.sum(ok),
        n_stamps=n_stamps,
        n_stamps_used=jnp.sum(fit.active),
        kernel_sum=kappa0,
        residual_mean=fit.residual_mean,
        residual_std=fit.residual_std,
        condition_number=fit.condition_number,
        template_coverage=coverage,
        n_iterations=fit.n_iterations,
        n_rejected_single=fit.n_rejected_single,
        n_rejected_ksum=fit.n_rejected_ksum,
        n_rejected_spatial=fit.n_rejected_spatial,
        science_variance_factor=factor_s,
        template_variance_factor=factor_t,
        variance_factor_failed=fail_s | fail_t,
        science_variance_pixels=st["n_var_s"],
        template_variance_pixels=st["n_var_t"],
        svar=svar,
        tvar=tvar,
    )
    if pre is not None:
        metadata["n_interpolated"] = pre.n_interpolated
    return SubtractResult(difference, matched, bg_model, kernel, metadata)


def _new_entries(stage):
    """The stage returning only the state entries it adds or replaces: an entry passed through a jitted call
    is copied (at 4096² the prepared state is 1.3 GB and passing it through took 0.32 s per stage)."""

    def run(st, *args):
        out = stage(st, *args)
        return {key: value for key, value in out.items() if key not in st or value is not st[key]}

    return run


_jit_prepare = eqx.filter_jit(_stage_prepare)
_jit_select = eqx.filter_jit(_new_entries(_stage_select))
_jit_fit = eqx.filter_jit(_new_entries(_stage_fit))
_jit_convolve = eqx.filter_jit(_new_entries(_stage_convolve))
_jit_decorrelate = eqx.filter_jit(_stage_decorrelate)


def _snr(image, variance, cy, cx, k):
    """Crude S/N of each candidate from its (2k+1)² stamp sum, used to rank sources without a flux."""
    dt = solve_dtype()
    good = usable(image, variance)
    side = 2 * k + 1
    img = _stamps.extract(jnp.where(good, image, 0.0), cy - k, cx - k, side).astype(dt)
    var = _stamps.extract(jnp.where(good, variance, 0.0), cy - k, cx - k, side).astype(dt)
    s, v = jnp.sum(img, axis=(1, 2)), jnp.sum(var, axis=(1, 2))
    return s / jnp.sqrt(jnp.where(v > 0, v, 1.0))


def _sentinels_to_nan(exposure: Exposure) -> Exposure:
    """The exposure with |pixel| ≥ `_MAX_PIXEL` (and ±inf) set to NaN, so that they are flagged NO_DATA."""
    image = exposure.image
    return dataclasses.replace(exposure, image=jnp.where(jnp.abs(image) < _MAX_PIXEL, image, jnp.nan))


def _repeated(cx, cy, ok, nx: int):
    """Usable candidates whose stamp centre an earlier usable candidate (lower index) already has."""
    idx = jnp.arange(cx.shape[0])
    key = jnp.where(ok, cy * nx + cx, -1 - idx)  # unusable candidates get distinct negative keys
    order = jnp.argsort(key, stable=True)
    sk = key[order]
    dup = jnp.concatenate([jnp.zeros(1, bool), sk[1:] == sk[:-1]])
    return jnp.zeros_like(ok).at[order].set(dup)
