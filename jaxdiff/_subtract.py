"""`subtract`: the pure, jit-compiled Alard–Lupton subtraction (ALGORITHM §3–§11).

The core is four stages that hand each other small typed values: `prepare` (variance rescaling, masks,
cut-outs, coverage), `select` (basis and stamps), `fit` (per-stamp fits, rejection, spatial solve) and
`difference` (convolution, difference, decorrelation). Each runs under a `jax.named_scope` of its name, so the
profiler attributes time to stages inside the one fused program.
"""

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _programs, spatial
from . import basis as _basis
from . import convolve as _convolve
from . import stamps as _stamps
from ._background import BackgroundModel
from ._config import SubtractConfig
from ._errors import RESULTS
from ._exposure import Exposure
from ._finalize import decorrelate_arrays, edge_pixels, variance_levels
from ._fit import FitResult, StampData, fit_kernel
from ._image_fit import fit_whole_image
from ._jit import dispatching_jit
from ._kernel import SpatialKernel
from ._mask import bitmask, free_bits, plane_bit
from ._noise import MAX_PIXELS as NOISE_PIXELS
from ._noise import block_size, exposure_source_free
from ._plan import PRECONVOLUTION_WIDTH, Plan, canonical_psf, convolves_template, coverage, make_plan, width_kwargs
from ._preconvolve import Preconvolved, fill_bad, preconvolve_science
from ._prepare import exclusion_bits, output_planes, padded_cut, prepare_science_mask, prepare_template_mask
from ._psf import ImagePsf, mean_sigma, pair_sigma_xy
from ._result import SubtractResult
from ._sources import Sources
from ._stats import quantile_masked, standard_good, usable, variance_factor
from ._types import select, solve_dtype
from .solvers._normal import split_theta

_RESCALE_EXCLUDE = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP")
# |pixel| at or above this is a fill sentinel (SExtractor/IRAF use ±1e30), not data: treated like NaN, since a
# finite 1e30 would leak through the FFT convolution and decorrelation into every output pixel
_MAX_PIXEL = 1e20


def subtract(
    template: Exposure,
    science: Exposure,
    sources: Sources,
    config: SubtractConfig | None = None,
    plan: Plan | None = None,
) -> SubtractResult:
    """PSF-match, subtract and (unless configured off) decorrelate: the pure function behind the task.

    Works eagerly, under `jax.jit`, `jax.vmap`, `jax.grad` and `jax.disable_jit()`. The mode (under
    `mode="auto"`), the basis widths and the source selection are decided inside the program from the data; only
    the `plan` (kernel size, source capacity, PSF image side) is static. Outside a transformation it is built
    from the inputs; under one, where the PSFs are traced, pass `plan=jd.make_plan(...)` built beforehand (a
    traced call without one raises `jd.PlanError`).

    Arguments:
        template: the reference exposure; its box must contain the science box.
        science: the new exposure; outputs live on its box.
        sources: candidate kernel stars (parent coordinates); padded to the plan's capacity.
        config: a `SubtractConfig` (default: LSST's defaults).
        plan: the static plan from `jd.make_plan` (default: made from these inputs).

    Returns:
        A `SubtractResult` whose `metadata` holds arrays (status code, counts, kernel sum, residual statistics,
        condition number, coverage, variance factors, basis widths, the mode taken). Never raises on data:
        `status` (a `jd.RESULTS` code) says what failed. The call returns once the program is dispatched, as JAX
        functions do: reading a value (or `jax.block_until_ready(result)`) waits for it.
    """
    config = SubtractConfig() if config is None else config
    if sources is None:
        raise ValueError(
            "jd.subtract needs a source list; detect one with jd.AlardLuptonSubtract().run(..., sources=None)"
        )
    plan = make_plan(template, science, sources, config) if plan is None else plan
    inputs = core_inputs(template, science, sources, psf_size=plan.psf_size, capacity=plan.capacity)
    options = xla_options(science.shape)
    # None unless an entry point turned the store on
    result = _programs.call("core", core, inputs, config, plan, compiler_options=options)
    if result is None:
        result = (_jit_core_low_memory if options else _jit_core)(*inputs, config, plan)
    return restore_wcs(result, science.wcs)


def core_inputs(template: Exposure, science: Exposure, sources: Sources | None, *, psf_size, capacity=None):
    """What the compiled core takes: exposures without WCS (a static field hashed by identity) and with PSFs
    padded to `psf_size`, and the sources padded to `capacity` (a stacked batch is allowed)."""

    def strip(e: Exposure) -> Exposure:
        psf = e.psf
        if psf_size is not None and psf is not None:
            pad = lambda p: canonical_psf(p, psf_size)
            psf = eqx.filter_vmap(pad)(psf) if e.image.ndim == 3 else pad(psf)
        return dataclasses.replace(e, wcs=None, psf=psf)

    if sources is not None:
        # one dtype for positions (float64 under x64): given and detected lists then share the program
        sources = sources.astype(jax.dtypes.canonicalize_dtype(np.float64))
        if capacity is not None:
            sources = sources.padded(capacity)
    return strip(template), strip(science), sources


def subtract_staged(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig, plan: Plan, clock):
    """`subtract` run stage by stage, each stage compiled on its own and timed with `block_until_ready`.

    Arguments:
        template, science, sources: inputs as `core_inputs` returns them for `plan`.
        plan: the static plan. clock: a callable returning seconds (e.g. `time.perf_counter`).

    Returns:
        (result, timings): the result of `subtract` (a test checks they agree) and the wall time of each of
        `STAGES`, compilation included on a first call.
    """
    timings = {}

    def timed(name, fn, *args):
        t0 = clock()
        out = jax.block_until_ready(fn(*args))
        timings[name] = clock() - t0
        return out

    prep = timed("prepare", _jit_prepare, template, science, config, plan, sources)
    if plan.fit_region == "image":
        sel, fitted = timed("fit", _jit_select_fit_image, prep, config, plan)
    else:
        sel = timed("select", _jit_select, prep, sources, config, plan)
        fitted = timed("fit", _jit_fit, sel, prep.box, config)
    return timed("difference", _jit_difference, prep, sel, fitted, config, plan), timings


def restore_wcs(result: SubtractResult, wcs) -> SubtractResult:
    """The result with the science WCS put back on the difference and the matched template."""
    if wcs is None:
        return result
    return dataclasses.replace(
        result,
        difference=dataclasses.replace(result.difference, wcs=wcs),
        matched_template=dataclasses.replace(result.matched_template, wcs=wcs),
    )


def core(
    template: Exposure,
    science: Exposure,
    sources: Sources,
    config: SubtractConfig,
    plan: Plan,
    axis_name: str | None = None,
):
    """The traceable subtraction for a fixed plan (not jitted: `subtract` jits it; batches vmap it).

    `axis_name`: the vmap axis name of a batch; the stamp work then skips what no pair of the batch needs
    (`stamps.over_slots`) instead of running both sides of every branch for every pair.
    """
    with jax.named_scope("prepare"):
        prep = prepare(template, science, config, plan, sources)
    if plan.fit_region == "image":
        with jax.named_scope("fit"):
            sel, fitted = select_fit_image(prep, config, plan)
    else:
        with jax.named_scope("select"):
            sel = select_stamps(prep, sources, config, plan, axis_name)
        with jax.named_scope("fit"):
            fitted = fit(sel, prep.box, config, axis_name)
    with jax.named_scope("difference"):
        return difference(prep, sel, fitted, config, plan)


STAGES = ("prepare", "select", "fit", "difference")


# XLA's CPU scheduler orders a program for concurrency by default: work that does not depend on the fit (the
# convolution's padded planes, the mask dilation) then starts early and stays live through the fit, so the
# scratch peaks higher. From `LOW_MEMORY_PIXELS` up the memory-optimised order saves memory at no cost in time
# (4096²: temporaries 560 → 443 MiB); below it the default was as fast or faster and the saving small
# (benchmarks/README.md: core temporaries and time per order at 1024² to 4096²).
LOW_MEMORY_PIXELS = 12_000_000
_LOW_MEMORY = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def xla_options(shape: tuple[int, ...]) -> dict:
    """The XLA compiler options of the core program for science images of `shape` (the last two axes) on the
    default backend: the memory-optimised CPU schedule from `LOW_MEMORY_PIXELS` pixels up, else none."""
    ny, nx = shape[-2:]
    if jax.default_backend() != "cpu" or ny * nx < LOW_MEMORY_PIXELS:
        return {}
    return dict(_LOW_MEMORY)


def _core(template: Exposure, science: Exposure, sources: Sources, config: SubtractConfig, plan: Plan):
    return core(template, science, sources, config, plan)


_jit_core = dispatching_jit(_core)
_jit_core_low_memory = dispatching_jit(_core, compiler_options=_LOW_MEMORY)


class Planes(NamedTuple):
    """Image, variance, mask and the in-array flag of one image on a box."""

    image: jax.Array
    variance: jax.Array
    mask: jax.Array
    inside: jax.Array


class Prepared(NamedTuple):
    """The inputs made ready for the fit (§1, §3, §4)."""

    template: Exposure  # sentinels → NaN; under preconvolution its bad pixels filled
    science: Exposure  # under preconvolution P ∗ S
    convolves_template: object  # the mode decision: a Python bool, or a traced bool under mode="auto"
    widths: tuple  # (σ of template, σ of science) or None
    var_s: jax.Array  # rescaled (and under preconvolution P² ∗ V) science variance
    var_s_raw: jax.Array  # rescaled science variance before preconvolution
    mask_s: jax.Array
    pre: Preconvolved | None
    box: jax.Array  # (x0, y0, width, height) of the fit's spatial domain
    t_grown: Planes  # template on the science box grown by h
    s_grown: Planes  # science on the science box grown by h
    t_box: Planes  # template on the science box
    coverage: jax.Array
    factors: jax.Array  # (template, science) variance factors
    factor_failed: jax.Array
    n_noise_pixels: jax.Array  # (template, science) pixels used by the variance estimate
    sources_s: jax.Array  # science pixels in source footprints (`_noise`), kept out of svar
    sources_t: jax.Array  # template pixels on the science box in source footprints, kept out of tvar


def prepare(
    template: Exposure, science: Exposure, config: SubtractConfig, plan: Plan, sources: Sources | None = None
) -> Prepared:
    """Variance rescaling, masks, cut-outs, coverage and the mode decision (ALGORITHM §1–§4)."""
    cfg = config
    h = plan.k // 2
    ny, nx = science.shape
    sdt = solve_dtype()
    out_planes = output_planes(science.mask_planes, template.mask_planes, cfg)
    nodata_bit = plane_bit(out_planes, "NO_DATA")
    box = jnp.stack([science.xy0[0], science.xy0[1], nx, ny]).astype(sdt)
    template, science = _sentinels_to_nan(template), _sentinels_to_nan(science)
    if plan.mode == "auto" and jax.tree.structure(template.psf) != jax.tree.structure(science.psf):
        # the mode is picked per pair inside the program, so the two PSFs must be interchangeable values
        template, science = (dataclasses.replace(e, psf=ImagePsf(e.psf.image())) for e in (template, science))
    widths = None
    if template.psf is not None and science.psf is not None:
        widths = pair_sigma_xy(template.psf, science.psf)
    is_t = convolves_template(plan.mode, *(widths or (None, None)))

    # the noise estimates' source detection smooths at the PSF widths just measured (not measured again)
    sig_t, sig_s = (None, None) if widths is None else (mean_sigma(w) for w in widths)
    var_t, f_t, fail_t, n_t, free_t = _rescaled_variance(template, cfg, sources, sig_t)
    var_s, f_s, fail_s, n_s, free_s = _rescaled_variance(science, cfg, sources, sig_s)

    mask_s = prepare_science_mask(science.mask, science.mask_planes, out_planes)
    mask_t = prepare_template_mask(template.mask, template.mask_planes, out_planes, cfg)
    if nodata_bit is not None:  # non-finite pixels carry no data: flag them so they are excluded and masked
        nd = jnp.asarray(1 << nodata_bit, mask_s.dtype)
        mask_s = mask_s | jnp.where(jnp.isfinite(science.image) & jnp.isfinite(var_s), 0, nd)
        mask_t = mask_t | jnp.where(jnp.isfinite(template.image) & jnp.isfinite(var_t), 0, nd)
    pre = None
    var_s_raw = var_s
    if cfg.use_preconvolution:  # score image (§12): fit T to P ∗ S over the inner box
        pre = preconvolve_science(science.image, var_s, mask_s, science.xy0, out_planes, science.psf, cfg)
        t_filled, _ = fill_bad(template.image, template.mask, template.mask_planes, cfg.bad_mask_planes)
        template = dataclasses.replace(template, image=t_filled)
        science = dataclasses.replace(science, image=pre.image)
        var_s, mask_s, box = pre.variance, pre.mask, pre.box
    offset = jnp.stack([science.xy0[1] - template.xy0[1], science.xy0[0] - template.xy0[0]])
    fill = (0.0, 1.0, 0, False)
    t_grown = Planes(
        *padded_cut((template.image, var_t, mask_t, jnp.ones(template.shape, bool)), offset, h, (ny, nx), fill)
    )
    s_grown = Planes(
        *padded_cut(
            (science.image, var_s, mask_s, jnp.ones((ny, nx), bool)), jnp.zeros(2, jnp.int32), h, (ny, nx), fill
        )
    )
    crop = (slice(h, h + ny), slice(h, h + nx))
    t_box = Planes(*(p[crop] for p in t_grown))
    return Prepared(
        template=template,
        science=science,
        convolves_template=is_t,
        widths=widths,
        var_s=var_s,
        var_s_raw=var_s_raw,
        mask_s=mask_s,
        pre=pre,
        box=box,
        t_grown=t_grown,
        s_grown=s_grown,
        t_box=t_box,
        coverage=coverage(template, science).astype(sdt),
        factors=jnp.stack([f_t, f_s]),
        factor_failed=fail_t | fail_s,
        n_noise_pixels=jnp.stack([n_t, n_s]),
        # pixel images of per-block values: XLA computes them where the variance levels read them
        sources_s=free_s.excluded((ny, nx)),
        sources_t=lax.dynamic_slice(free_t.excluded(template.shape), (offset[0], offset[1]), (ny, nx)),
    )


def _rescaled_variance(e: Exposure, cfg: SubtractConfig, sources: Sources | None, sigma=None):
    """(variance × factor, factor, both estimates failed, pixels used, `SourceFree`) per §4.1 (factor 1 when
    turned off), estimated outside source footprints whatever the masks say (`_noise`); `sigma`: the PSF's
    measured width, if known."""
    sdt = solve_dtype()
    good = (e.mask & bitmask(e.mask_planes, _RESCALE_EXCLUDE)) == 0
    free = exposure_source_free(e, good, sources, sigma)
    if not cfg.do_scale_variance:
        return e.variance, jnp.ones((), sdt), jnp.zeros((), bool), jnp.zeros((), jnp.int32), free
    # variance_factor reads every b-th row and column (b = block_size: the same cap on the pixels it examines),
    # where the footprints are known per block: read that grid here, and it reads all of it
    grid = (slice(None, None, block_size(e.shape, NOISE_PIXELS)),) * 2
    good = good[grid] & ~free.excluded_on_grid()
    f, r_est, l_est, n_good = variance_factor(
        e.image[grid], e.variance[grid], good, max_pixels=NOISE_PIXELS, always_level=False
    )
    fail = (r_est > 10) & (l_est > 10)
    return e.variance * f.astype(e.variance.dtype), f.astype(sdt), fail, jnp.asarray(n_good, jnp.int32), free


class Roles(NamedTuple):
    """The mode's view of the planes: X is convolved, Y is matched to."""

    x_grown: Planes
    y_image: jax.Array
    y_var: jax.Array
    y_mask: jax.Array


def roles(prep: Prepared) -> Roles:
    """convolveTemplate: X = template, Y = science; convolveScience the other way round (§2)."""
    is_t = prep.convolves_template
    x = select(is_t, prep.t_grown, prep.s_grown)
    y = select(
        is_t, (prep.science.image, prep.var_s, prep.mask_s), (prep.t_box.image, prep.t_box.variance, prep.t_box.mask)
    )
    return Roles(x, *y)


class Selection(NamedTuple):
    """Kernel basis and stamp slots (§5, §6)."""

    data: StampData
    basis_images: jax.Array
    factors: tuple  # (fx, fy, mix, x_groups): the separable form of the basis
    reg: jax.Array | None
    basis_widths: jax.Array
    basis_code: jax.Array
    n_candidates: jax.Array
    n_stamps: jax.Array


def select_stamps(
    prep: Prepared, sources: Sources, config: SubtractConfig, plan: Plan, axis_name: str | None = None
) -> Selection:
    """Kernel basis and stamp selection (ALGORITHM §5, §6)."""
    cfg = config
    k = plan.k
    h = k // 2
    ny, nx = prep.science.shape
    sdt = solve_dtype()
    science, pre = prep.science, prep.pre
    rl = roles(prep)

    if cfg.kernel_basis == "alard-lupton":
        if prep.widths is None:
            sig_x = sig_y = None
        else:
            sig_t, sig_s = (mean_sigma(w) for w in prep.widths)
            if pre is not None:
                sig_s = sig_s * PRECONVOLUTION_WIDTH
            sig_x, sig_y = select(prep.convolves_template, (sig_t, sig_s), (sig_s, sig_t))
        widths, code = _basis.alard_lupton_widths_traced(sig_x, sig_y, **width_kwargs(cfg))
        fx, fy, mix = _basis.alard_lupton_factors(k, widths, tuple(cfg.al_deg_gauss), cfg.orthonormalize_basis)
        basis_images = jnp.einsum("br,rv,ru->bvu", mix, fy, fx)
        groups = _basis.x_factor_groups(tuple(cfg.al_deg_gauss))
    else:
        basis_images = _basis.delta_function(k).astype(sdt)
        eye = jnp.eye(k, dtype=sdt)
        fx = jnp.tile(eye, (k, 1))
        fy = jnp.repeat(eye, k, axis=0)
        mix = basis_images.reshape(basis_images.shape[0], -1)
        groups = (tuple(range(k)), tuple(r % k for r in range(k * k)))  # raw image r has column factor eye[r % k]
        widths, code = jnp.zeros(0, sdt), jnp.asarray(0)
    n = basis_images.shape[0]
    reg = None
    if cfg.kernel_basis == "delta-function" and cfg.use_regularization:
        H = _basis.regularization_matrix(
            k, basis_images, lambda_value=cfg.lambda_value, border_penalty=cfg.regularization_border_penalty
        )
        reg = jnp.zeros((n + 1, n + 1), sdt).at[:n, :n].set(H)

    # --- stamps (§6) ---
    out_planes = output_planes(science.mask_planes, prep.template.mask_planes, cfg)
    t_box = prep.t_box
    bad = ((prep.mask_s | t_box.mask) & exclusion_bits(out_planes, cfg)) != 0
    bad = bad | ~usable(science.image, prep.var_s) | ~usable(t_box.image, t_box.variance) | ~t_box.inside
    cx, cy = _stamps.centres(sources.x, sources.y, science.xy0)
    margin = (k if cfg.restrict_kernel_edge_sources else 0) + (k if pre is not None else 0)
    ok = _stamps.usable_candidates(cx, cy, sources.valid, bad, k, margin)
    ok = ok & ~_repeated(cx, cy, ok, nx)  # a duplicated source must not count its stamp twice
    side = 2 * k + 1
    # sources without a flux are ranked by their measured S/N (only computed when one lacks a flux)
    missing = jnp.any(sources.valid & ~jnp.isfinite(sources.flux))
    snr = lax.cond(
        _stamps.batch_any(missing, axis_name),
        lambda: _snr(science.image, prep.var_s, cy, cx, k).astype(sources.flux.dtype),
        lambda: jnp.zeros_like(sources.flux),
    )
    score = jnp.where(jnp.isfinite(sources.flux), sources.flux, snr)
    index, slot_valid = _stamps.rank_and_pack(score, ok, plan.n_slots)
    if 0 <= cfg.max_kernel_sources < plan.n_slots:
        slot_valid = slot_valid & (jnp.arange(plan.n_slots) < cfg.max_kernel_sources)
    scx, scy = cx[index], cy[index]
    r0, c0 = scy - k, scx - k
    x_stamp = _stamps.extract(rl.x_grown.image, r0 + h, c0 + h, side)
    vx_stamp = _stamps.extract(rl.x_grown.variance, r0 + h, c0 + h, side)
    y_stamp = _stamps.extract(rl.y_image, r0, c0, side)
    vy_stamp = _stamps.extract(rl.y_var, r0, c0, side)
    core_sl = (slice(None), slice(h, side - h), slice(h, side - h))
    good_core = _stamps.extract(~bad, r0, c0, side)[core_sl]
    finite = slot_valid[:, None, None]
    x_stamp = jnp.where(finite & jnp.isfinite(x_stamp), x_stamp, 0.0).astype(sdt)
    vx_stamp = jnp.where(finite & jnp.isfinite(vx_stamp), vx_stamp, 1.0).astype(sdt)
    y_core = jnp.where(finite & jnp.isfinite(y_stamp), y_stamp, 0.0).astype(sdt)[core_sl]
    vy_core = jnp.where(finite & jnp.isfinite(vy_stamp), vy_stamp, 1.0).astype(sdt)[core_sl]
    if cfg.constant_variance_weighting:
        total = (vx_stamp + jnp.where(finite, vy_stamp, 1.0)).reshape(len(index), -1)
        med = _stamps.over_slots(
            jax.vmap(lambda v: quantile_masked(v, jnp.ones(v.shape, bool), 0.5)),
            slot_valid,
            total,
            fill=1.0,
            axis_name=axis_name,
        )
        weight = jnp.where(med > 0, 1.0 / jnp.where(med > 0, med, 1.0), 1.0)
    else:
        weight = 1.0 / (vx_stamp[core_sl] + vy_core)
    sx_pos = sources.x[index].astype(sdt)
    sy_pos = sources.y[index].astype(sdt)
    data = StampData(
        x_stamp=x_stamp,
        vx_stamp=vx_stamp,
        y_core=y_core,
        vy_core=vy_core,
        good_core=good_core & finite,
        weight=weight,
        p=spatial.terms(sx_pos, sy_pos, prep.box, cfg.spatial_kernel_order, cfg.spatial_model_type).T,
        q=spatial.terms(sx_pos, sy_pos, prep.box, cfg.spatial_bg_order, cfg.spatial_model_type).T,
        cx=scx,
        cy=scy,
        valid=slot_valid,
        test_dtype=jnp.dtype(rl.x_grown.image.dtype),
    )
    return Selection(
        data=data,
        basis_images=basis_images,
        factors=(fx, fy, mix, groups),
        reg=reg,
        basis_widths=widths,
        basis_code=code,
        n_candidates=jnp.sum(ok),
        n_stamps=jnp.sum(slot_valid),
    )


class Fitted(NamedTuple):
    """The fitted kernel and background (§7, §8)."""

    fit: FitResult
    kernel: SpatialKernel
    bg_coeffs: jax.Array
    extra: dict | None = None  # further metadata of the fit (the whole-image fit's pixel counts)


def select_fit_image(prep: Prepared, config: SubtractConfig, plan: Plan) -> tuple[Selection, Fitted]:
    """The select and fit stages for `plan.fit_region == "image"` (`_image_fit`): no stamps (`data` None)."""
    r = fit_whole_image(prep, config, plan)
    zero = jnp.zeros((), jnp.int32)
    sel = Selection(None, r.basis_images, r.factors, None, r.basis_widths, r.basis_code, zero, zero)
    return sel, Fitted(r.fit, r.kernel, r.bg_coeffs, r.extra)


def fit(sel: Selection, box, config: SubtractConfig, axis_name: str | None = None) -> Fitted:
    """Per-stamp fits, rejection loop and the global spatial solve (ALGORITHM §7, §8)."""
    cfg = config
    n = sel.basis_images.shape[0]
    P = spatial.n_terms(cfg.spatial_kernel_order)
    result = fit_kernel(sel.data, sel.basis_images, sel.factors, cfg.solver, cfg, sel.reg, axis_name)
    theta0, kernel_terms, bg_terms = split_theta(result.theta, n, P)
    coeffs = jnp.zeros((n, P), theta0.dtype).at[0, 0].set(theta0).at[1:, :].set(kernel_terms)
    kernel = SpatialKernel(sel.basis_images, coeffs, box, cfg.spatial_kernel_order, cfg.spatial_model_type)
    return Fitted(result, kernel, bg_terms)


def difference(prep: Prepared, sel: Selection, fitted: Fitted, config: SubtractConfig, plan: Plan) -> SubtractResult:
    """Apply the kernel, form the difference, decorrelate and assemble the result (ALGORITHM §9–§11, §13)."""
    cfg = config
    h = plan.k // 2
    science, template, pre = prep.science, prep.template, prep.pre
    ny, nx = science.shape
    out_planes = output_planes(science.mask_planes, template.mask_planes, cfg)
    is_t = prep.convolves_template
    rl = roles(prep)
    kernel, bg_coeffs = fitted.kernel, fitted.bg_coeffs
    kappa0 = kernel.coefficients[0, 0]
    t_box = prep.t_box

    # --- apply the kernel (§9) ---
    x = rl.x_grown
    if not xla_options((ny, nx)) and jax.default_backend() == "cpu":
        # The convolution's input planes wait for the stamp selection: their kernel-independent passes
        # (padding, mask dilation) then run beside the fit, whose small operations leave a CPU core idle,
        # instead of beside the selection. Not under the memory-optimised schedule: those planes would then
        # be held through the fit (4096²: temporaries 443 -> 508 MiB).
        x = Planes(*lax.optimization_barrier((*x, sel.n_stamps))[:4])
    img_dtype = x.image.dtype
    tx, ty = spatial.separable_terms(
        prep.box, (ny + 2 * h, nx + 2 * h), science.xy0 - h, cfg.spatial_kernel_order, cfg.spatial_model_type
    )
    x_good = usable(x.image, x.variance) & x.inside
    stride = max(1, int(np.ceil(np.sqrt(x.image.size / 2**16))))  # the level only needs ~6e4 samples
    x_med = quantile_masked(x.image[::stride, ::stride], x_good[::stride, ::stride], 0.5)
    x_med = lax.stop_gradient(jnp.where(jnp.isfinite(x_med), x_med, 0.0))
    conv_img, conv_var, conv_mask = _convolve.convolve_spatial(
        x.image,
        x.variance,
        x.mask,
        kernel.components().astype(img_dtype),
        tx.astype(img_dtype),
        ty.astype(img_dtype),
        valid=x.inside,
        edge_bit=plane_bit(out_planes, "EDGE"),
        preserve_bits=bitmask(out_planes, cfg.preserve_mask_planes),
        offset=x_med.astype(img_dtype),
        interior=h,
        spare_bits=free_bits(out_planes, 3),
    )

    # --- difference (§10): convolveTemplate S − K∗T − B; convolveScience (K∗S − T + B)/κ₀ = −(T − K∗S − B)/κ₀ ---
    bg_sub = BackgroundModel(bg_coeffs, prep.box, cfg.spatial_bg_order, cfg.spatial_model_type).image(
        (ny, nx), science.xy0, dtype=img_dtype
    )
    if not cfg.do_subtract_background:
        bg_sub = jnp.zeros_like(bg_sub)
    k0 = kappa0.astype(img_dtype)
    sign, scale = select(is_t, (jnp.ones((), img_dtype), jnp.ones((), img_dtype)), (-jnp.ones((), img_dtype), k0))
    diff_img = sign * (rl.y_image - conv_img - bg_sub) / scale
    diff_var = (rl.y_var + conv_var) / scale**2
    diff_mask = rl.y_mask | conv_mask
    calib = template.photo_calib
    matched = select(
        is_t,
        Exposure(conv_img, conv_var, conv_mask, science.psf, science.xy0, calib, mask_planes=out_planes),
        Exposure(
            t_box.image / k0,
            t_box.variance / k0**2,
            t_box.mask,
            template.psf,
            science.xy0,
            calib,
            mask_planes=out_planes,
        ),
    )
    bg_model = BackgroundModel(
        select(is_t, bg_coeffs, -bg_coeffs / kappa0), prep.box, cfg.spatial_bg_order, cfg.spatial_model_type
    )
    psf_diff = select(is_t, science.psf, template.psf)
    var_u, var_c = select(is_t, (prep.var_s_raw, t_box.variance), (t_box.variance, prep.var_s))

    # --- decorrelation (§11) ---
    good_s = standard_good(science.image, prep.var_s, diff_mask, out_planes) & ~prep.sources_s
    good_t = standard_good(t_box.image, t_box.variance, diff_mask, out_planes) & ~prep.sources_t
    good_u, good_c = select(is_t, (good_s, good_t), (good_t, good_s))
    if cfg.do_decorrelation:
        d_img, d_var, psf_diff, v_u, v_c = decorrelate_arrays(
            diff_img,
            diff_var,
            var_u,
            var_c,
            good_u,
            good_c,
            kernel,
            psf_diff,
            science_matched=(not is_t) if isinstance(is_t, bool) else ~is_t,
            preconv_kernel=None if pre is None else pre.kernel,
            excluded=edge_pixels(diff_mask, out_planes),
        )
    else:
        d_img, d_var = diff_img, diff_var
        v_u, v_c = variance_levels((var_u, var_c), (good_u, good_c))
    svar, tvar = select(is_t, (v_u, v_c), (v_c, v_u))
    diff = Exposure(
        d_img.astype(img_dtype),
        d_var.astype(img_dtype),
        diff_mask,
        psf_diff,
        science.xy0,
        science.photo_calib,
        mask_planes=out_planes,
    )
    metadata = _metadata(prep, sel, fitted, cfg)
    metadata.update(svar=svar, tvar=tvar)
    return SubtractResult(diff, matched, bg_model, kernel, metadata)


def _metadata(prep: Prepared, sel: Selection, fitted: Fitted, cfg: SubtractConfig) -> dict:
    fit_result = fitted.fit
    theta = fit_result.theta
    # the first failure that applies, in the order the shell checks them (ALGORITHM §3, §6, §8)
    stamps = sel.data is not None  # the whole-image fit has no stamps to count
    checks = [
        (prep.coverage < cfg.required_template_fraction, RESULTS.no_work),
        *(((sel.n_stamps < cfg.min_kernel_sources, RESULTS.insufficient_sources),) if stamps else ()),
        *(((jnp.sum(fit_result.active) == 0, RESULTS.no_candidates),) if stamps else ()),
        (~jnp.all(jnp.isfinite(theta)), RESULTS.nonfinite_solution),
    ]
    status = jnp.select([c for c, _ in checks], [r for _, r in checks], RESULTS.successful).astype(jnp.int32)
    md = dict(
        status=status,
        convolves_template=jnp.asarray(prep.convolves_template),
        n_candidates=sel.n_candidates,
        n_stamps=sel.n_stamps,
        n_stamps_used=jnp.sum(fit_result.active),
        kernel_sum=fitted.kernel.coefficients[0, 0],
        residual_mean=fit_result.residual_mean,
        residual_std=fit_result.residual_std,
        condition_number=fit_result.condition_number,
        template_coverage=prep.coverage,
        n_iterations=fit_result.n_iterations,
        n_rejected_single=fit_result.n_rejected_single,
        n_rejected_ksum=fit_result.n_rejected_ksum,
        n_rejected_spatial=fit_result.n_rejected_spatial,
        spatial_kernel_order_used=fit_result.kernel_order_used,
        spatial_bg_order_used=fit_result.bg_order_used,
        template_variance_factor=prep.factors[0],
        science_variance_factor=prep.factors[1],
        variance_factor_failed=prep.factor_failed,
        template_variance_pixels=prep.n_noise_pixels[0],
        science_variance_pixels=prep.n_noise_pixels[1],
        basis_sigmas=sel.basis_widths,
        basis_mode_code=sel.basis_code,
    )
    if prep.widths is not None:
        md["template_psf_sigma"], md["science_psf_sigma"] = (mean_sigma(w) for w in prep.widths)
    if prep.pre is not None:
        md["n_interpolated"] = prep.pre.n_interpolated
    md.update(fitted.extra or {})
    return md


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


_jit_prepare = eqx.filter_jit(prepare)
_jit_select = eqx.filter_jit(select_stamps)
_jit_fit = eqx.filter_jit(fit)
_jit_select_fit_image = eqx.filter_jit(select_fit_image)
_jit_difference = eqx.filter_jit(difference)
