"""Kernel fit on the whole overlap instead of star stamps: the path for alert-sized cut-outs.

Survey alerts carry aligned 63 × 63 science/template stamps. With LSST's kernel sizes (21–35 px) no star stamp
fits on them (a (2k + 1)² stamp at least k from the edge needs a side > 4k), so, as PyTorchDIA (Hitchcock et al.
2021) and SFFT (Hu et al. 2022) do, a spatially constant kernel and a low-order background are fitted to every
usable pixel of the overlap at once: Y ≈ Σ_b a_b (B_b ∗ X) + Σ_m c_m g_m, by float64 weighted normal equations.
Pixels the model cannot explain (the transient itself, a variable star) would bias the kernel, so the fit is
repeated `CLIP_PASSES` times with pixels whose normalised residual exceeds `_CLIP_SIGMA` (grown by `_CLIP_GROW`
pixels) given zero weight; the selection is held out of the derivative, the final solve is differentiable.
Everything has static shapes: the path jits, vmaps over stacked cut-outs and differentiates.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import basis as _basis
from . import spatial
from ._config import check_fit_region
from ._fit import FitResult, pixel_fit_result
from ._kernel import SpatialKernel
from ._prepare import exclusion_bits, output_planes
from ._psf import mean_sigma
from ._stats import quantile_masked, usable
from ._types import Array, Bool, Float, Image, select, solve_dtype
from .solvers import condition_number, symmetric_solve

_CLIP_SIGMA = 4.0  # |residual| / σ above which a pixel is left out of the next pass
_CLIP_GROW = 2  # rejected pixels grow by this many pixels (a transient's wings sit below the threshold)
CLIP_PASSES = 3  # solves in all: one unclipped, two clipped
_GRAM_ROWS = 8  # image rows per band of the normal-equation sums


def stamps_can_fit(shape: tuple[int, int], k: int, config) -> bool:
    """Whether any (2k + 1)² kernel stamp centre can lie in an image of `shape` (ALGORITHM §6's geometry)."""
    margin = (k if config.restrict_kernel_edge_sources else 0) + (k if config.use_preconvolution else 0)
    return min(shape) > 2 * (k + margin)


def resolve_fit_region(config, shape: tuple[int, int], k: int) -> str:
    """The static fit region: `config.fit_region`, with "auto" → "image" when no stamp can fit, else "stamps".

    The task also falls back to "image" under "auto" when the stamp fit finds too few usable sources.
    """
    check_fit_region(config.fit_region)
    region = config.fit_region
    if region == "auto":
        region = "stamps" if stamps_can_fit(shape, k, config) else "image"
    if region == "image":
        if config.use_preconvolution:
            raise ValueError("fit_region='image' does not support use_preconvolution; use fit_region='stamps'")
        if min(shape) <= 2 * k:
            raise ValueError(
                f"fit_region='image' with kernel size {k} needs an image larger than {2 * k} px on each side "
                f"(the kernel must fit with room to spare), got {shape}; lower kernel_size_max / kernel_size"
            )
    return region


def _grow(flag: Bool[Array, "ny nx"], r: int) -> Bool[Array, "ny nx"]:
    """Flags dilated by a (2r + 1)² box."""
    w = 2 * r + 1
    return lax.reduce_window(flag.astype(jnp.int8), jnp.int8(0), lax.max, (w, w), (1, 1), "SAME") > 0


def clip_mask(good: Bool[Array, "ny nx"], residual: Image) -> Bool[Array, "ny nx"]:
    """`good` less the pixels whose normalised residual exceeds `_CLIP_SIGMA`, grown by `_CLIP_GROW` (no gradient)."""
    return good & ~_grow(good & (jnp.abs(lax.stop_gradient(residual)) > _CLIP_SIGMA), _CLIP_GROW)


def box_all(ok: Bool[Array, "my mx"], k: int) -> Bool[Array, "ny nx"]:
    """Valid-mode: whether the whole k × k box of each output pixel is ok."""
    return lax.reduce_window(ok.astype(jnp.int8), jnp.int8(1), lax.min, (k, k), (1, 1), "VALID") > 0


def separable_valid(
    image: Float[Array, "my mx"], fx, fy, groups: tuple[tuple[int, ...], tuple[int, ...]] | None = None, extra=()
) -> tuple[Float[Array, "r ny nx"], np.ndarray]:
    """Valid-mode convolution of one image with separable kernels fy[r] ⊗ fx[r] (output side shrunk by k − 1).

    Each axis is a sum of k shifted slices, which XLA fuses into one pass per distinct column factor without
    intermediates: under `vmap` over cut-outs this holds little more than the output, where FFTs held several
    padded spectra per kernel (100 63² cut-outs: 594 → 251 MB of XLA temporaries for the whole fit).

    Arguments:
        image: (my, mx).
        fx, fy: (r, k) column and row factors, element [r, h + u] the weight at offset u (convolution).
        groups: optional static (first, inverse) of raw kernels sharing a column factor (`basis.x_factor_groups`).
        extra: further (ny, nx) planes appended after the convolutions (one buffer instead of a concatenation).

    Returns:
        (planes, order): the r convolved planes grouped by column factor, then `extra`; row i holds raw kernel
        order[i] (a static permutation).
    """
    k = fx.shape[-1]
    my, mx = image.shape
    ny, nx = my - k + 1, mx - k + 1
    first, inverse = (tuple(range(fx.shape[0])),) * 2 if groups is None else groups
    # out[i] = Σ_u f[h + u] x[i + h − u] = Σ_j f[k − 1 − j] x[i + j]
    fxr = fx[np.asarray(first)][:, ::-1].astype(image.dtype)
    fyr = fy[:, ::-1].astype(image.dtype)
    out, order = [], []
    for g in range(len(first)):
        zx = sum(fxr[g, j] * image[:, j : j + nx] for j in range(k))
        rows = np.flatnonzero(np.asarray(inverse) == g)
        order.extend(rows)
        out.append(sum(fyr[rows, j, None, None] * zx[None, j : j + ny, :] for j in range(k)))
    return jnp.concatenate(out + [jnp.asarray(e, image.dtype)[None] for e in extra]), np.asarray(order)


def gram(planes: Float[Array, "r ny nx"], weight: Image, target: Image, rows: int = _GRAM_ROWS):
    """(Σ_p w A_r A_s, Σ_p w A_r y) in the weights' dtype, reading the planes in bands of `rows` image rows, so
    that only a band is ever held in float64 (a sequential loop: under `vmap` it stays one band per cut-out)."""
    r, ny, nx = planes.shape
    b = min(rows, ny)
    dt = weight.dtype

    def body(i, acc):
        start = jnp.minimum(i * b, ny - b)  # the last band may overlap the one before: its rows count once
        a = lax.dynamic_slice_in_dim(planes, start, b, axis=1).astype(dt).reshape(r, -1)
        fresh = (start + jnp.arange(b)) >= i * b
        w = (lax.dynamic_slice_in_dim(weight, start, b, axis=0) * fresh[:, None]).reshape(-1)
        t = lax.dynamic_slice_in_dim(target, start, b, axis=0).reshape(-1)
        aw = a * w[None, :]
        return acc[0] + aw @ a.T, acc[1] + aw @ t

    return lax.fori_loop(0, -(-ny // b), body, (jnp.zeros((r, r), dt), jnp.zeros(r, dt)))


def fit_image_kernel(
    x_img: Float[Array, "my mx"],
    x_var: Float[Array, "my mx"],
    x_ok: Bool[Array, "my mx"],
    y_img: Image,
    y_var: Image,
    y_ok: Bool[Array, "ny nx"],
    factors,
    bg_terms: Float[Array, "q ny nx"],
    *,
    first_factors=None,
    constant_weight: bool = True,
    reg: Float[Array, "n n"] | None = None,
):
    """Fit one spatially constant kernel and a background to every usable pixel (float64 normal equations).

    Arguments:
        x_img, x_var, x_ok: the image to convolve (X), its variance and usable flags, grown by h = k // 2 on
            each side of the matched image's box (element [h, h] is Y's pixel [0, 0]).
        y_img, y_var, y_ok: the image to match (Y), its variance and usable flags.
        factors: the kernel basis in separable form (fx, fy, mix, groups): raw image r is fy[r] ⊗ fx[r], basis
            image b is Σ_r mix[b, r] raw_r (B_0 sums to 1, the others to 0); groups as `separable_valid`.
        bg_terms: (q, ny, nx) background term planes.
        first_factors: optional basis (same form) of a first, rigid fit that only sets the first clipping mask:
            concentric Gaussians cannot move a template source onto a science-only one (a transient beside its
            host or a star), which the full basis, fitted to all pixels, partly does.
        constant_weight: weight every pixel by 1/median(V_X + V_Y) (ip_diffim's constantVarianceWeighting)
            instead of 1/(V_X + V_Y) (static).
        reg: optional (n, n) penalty added to the kernel block (delta-function regularisation).

    Returns:
        (theta, basis, stats): theta holds the n kernel coefficients then the q background ones; basis the
        (n, k, k) basis images; stats a dict of 0-d arrays: condition_number, residual_mean and residual_std
        (normalised residuals of the pixels used), n_fit_pixels, n_clipped_pixels.
    """
    sdt = solve_dtype()
    fx, fy, mix, groups = factors
    n, k = mix.shape[0], fx.shape[-1]
    h = k // 2
    q = bg_terms.shape[0]
    x_ok = x_ok & usable(x_img, x_var)
    good0 = box_all(x_ok, k) & y_ok & usable(y_img, y_var)
    # the design planes are image-sized: they keep the image dtype; only the normal equations are in `sdt`
    xf = jnp.where(x_ok, x_img, 0.0)
    y = jnp.where(good0, y_img, 0.0).astype(sdt)
    vy = jnp.where(good0, y_var, 1.0).astype(sdt)
    vx_centre = jnp.where(x_ok, x_var, 0.0)[h:-h, h:-h].astype(sdt)
    if constant_weight:
        med = quantile_masked(vx_centre + vy, good0, 0.5)
        base_w = jnp.ones_like(vy) / jnp.where(med > 0, med, 1.0)
    else:
        base_w = 1.0 / (vy + vx_centre)

    def design(fac):
        """Raw designs and background as rows, and the map T from (basis, background) to them."""
        fx_, fy_, mix_, groups_ = fac
        planes, order = separable_valid(xf, fx_, fy_, groups_, tuple(bg_terms))
        m, r = mix_.shape
        T = jnp.zeros((m + q, r + q), sdt).at[:m, :r].set(mix_[:, order].astype(sdt))
        return planes, T.at[m:, r:].set(jnp.eye(q, dtype=sdt))

    def solve(A, T, good, penalty=None):
        G, v = gram(A, jnp.where(good, base_w, 0.0), y)
        M = T @ G @ T.T
        if penalty is not None:
            M = M.at[:n, :n].add(penalty.astype(sdt))
        theta = symmetric_solve(M, T @ v)
        return theta, M

    def clip(r):
        return clip_mask(good0, r)

    def residual(A, T, theta, kernel_sq_sum):
        # K² ∗ V_X with V_X locally constant over the kernel (the clipping and statistics only need its scale)
        var = vy + vx_centre * kernel_sq_sum
        model = jnp.tensordot((T.T @ theta).astype(A.dtype), A, axes=1).astype(sdt)
        return (y - model) / jnp.sqrt(jnp.where(var > 0, var, 1.0))

    def kernel_images(fac, coef):
        fx_, fy_, mix_, _ = fac
        return jnp.einsum("b,br,rv,ru->vu", coef, mix_.astype(sdt), fy_.astype(sdt), fx_.astype(sdt))

    good = good0
    if first_factors is not None:
        A0, T0 = design(first_factors)
        m = first_factors[2].shape[0]
        theta0, _ = solve(A0, T0, good0)
        good = clip(residual(A0, T0, theta0, jnp.sum(kernel_images(first_factors, theta0[:m]) ** 2)))
    A, T = design(factors)
    for _ in range(CLIP_PASSES - 1):
        theta, _ = solve(A, T, good, reg)
        good = clip(residual(A, T, theta, jnp.sum(kernel_images(factors, theta[:n]) ** 2)))
    theta, M = solve(A, T, good, reg)
    basis = jnp.einsum("br,rv,ru->bvu", mix.astype(sdt), fy.astype(sdt), fx.astype(sdt))
    ksq = jnp.sum(jnp.tensordot(lax.stop_gradient(theta[:n]), basis, axes=1) ** 2)
    r = residual(A, T, lax.stop_gradient(theta), ksq)
    cnt = jnp.sum(good)
    mean = jnp.sum(jnp.where(good, r, 0.0)) / jnp.maximum(cnt, 1)
    std = jnp.sqrt(jnp.sum(jnp.where(good, (r - mean) ** 2, 0.0)) / jnp.maximum(cnt - 1, 1))
    stats = dict(
        condition_number=condition_number(lax.stop_gradient(M)),
        residual_mean=mean,
        residual_std=std,
        n_fit_pixels=cnt.astype(jnp.int32),
        n_clipped_pixels=jnp.sum(good0 & ~good).astype(jnp.int32),
    )
    return theta, basis, stats


def _factors_for(prep, k: int, cfg):
    """(factors, first_factors, reg, widths, code): the kernel basis in separable form, the rigid first-pass basis
    (the basis's Gaussians without their polynomials; for delta functions the identity), the delta-function
    regulariser, and the basis widths and width-case code, for kernel side k and the (traced) PSF widths."""
    sdt = solve_dtype()
    if cfg.kernel_basis == "alard-lupton":
        sig_x = sig_y = None
        if prep.widths is not None:
            sig_t, sig_s = (mean_sigma(w) for w in prep.widths)
            sig_x, sig_y = select(prep.convolves_template, (sig_t, sig_s), (sig_s, sig_t))
        widths, code = _basis.alard_lupton_widths_traced(
            sig_x,
            sig_y,
            sig_gauss=tuple(cfg.al_sig_gauss),
            beta=cfg.al_gauss_beta,
            min_sig=cfg.al_min_sig,
            min_sig_deconv=cfg.al_min_sig_deconv,
            scale_by_fwhm=cfg.scale_by_fwhm and sig_x is not None,
        )
        degrees = tuple(cfg.al_deg_gauss)
        factors = (*_basis.alard_lupton_factors(k, widths, degrees, cfg.orthonormalize_basis),)
        factors = (*factors, _basis.x_factor_groups(degrees))
        zeros = (0,) * len(degrees)
        first = (*_basis.alard_lupton_factors(k, widths, zeros, orthonormalize=False), None)
        return factors, first, None, widths, code
    eye = jnp.eye(k, dtype=sdt)
    basis_images = _basis.delta_function(k).astype(sdt)
    groups = (tuple(range(k)), tuple(r % k for r in range(k * k)))
    factors = (jnp.tile(eye, (k, 1)), jnp.repeat(eye, k, axis=0), basis_images.reshape(k * k, -1), groups)
    centre = eye[k // 2][None]
    first = (centre, centre, jnp.ones((1, 1), sdt), None)
    reg = None
    if cfg.use_regularization:
        reg = _basis.regularization_matrix(
            k, basis_images, lambda_value=cfg.lambda_value, border_penalty=cfg.regularization_border_penalty
        )
    return factors, first, reg, jnp.zeros(0, sdt), jnp.asarray(0)


class ImageFit(NamedTuple):
    """The whole-overlap fit, in the terms of the core's select and fit stages (`_subtract` wraps it)."""

    kernel: SpatialKernel  # spatially constant: only its spatial term 0 is non-zero, in the configured order
    bg_coeffs: Array
    fit: FitResult  # no stamps: `active` is a single False slot
    basis_images: Array
    factors: tuple
    basis_widths: Array
    basis_code: Array
    extra: dict  # n_fit_pixels, n_clipped_pixels


def fit_whole_image(prep, config, plan) -> ImageFit:
    """The select and fit stages for `plan.fit_region == "image"`: one kernel and background on every usable pixel.

    Arguments:
        prep: the core's `Prepared` stage output (grown cut-outs, masks, variances, box, mode decision).
        config: the `SubtractConfig`. plan: the static plan (kernel side `plan.k`).
    """
    cfg = config
    sdt = solve_dtype()
    science, template = prep.science, prep.template
    ny, nx = science.shape
    k = plan.k
    excl = exclusion_bits(output_planes(science.mask_planes, template.mask_planes, cfg), cfg)
    is_t = prep.convolves_template
    x = select(is_t, prep.t_grown, prep.s_grown)
    y_img, y_var = select(is_t, (science.image, prep.var_s), (prep.t_box.image, prep.t_box.variance))
    # a pixel excluded in either image's mask is out, as for stamps (§6)
    bad = ((prep.mask_s | prep.t_box.mask) & excl) != 0
    x_ok = x.inside & ((x.mask & excl) == 0)
    y_ok = ~bad & prep.t_box.inside
    factors, first, reg, widths, code = _factors_for(prep, k, cfg)
    tx, ty = spatial.separable_terms(prep.box, (ny, nx), science.xy0, cfg.spatial_bg_order, cfg.spatial_model_type)
    bg_terms = ty.astype(sdt)[:, :, None] * tx.astype(sdt)[:, None, :]
    theta, basis_images, stats = fit_image_kernel(
        x.image,
        x.variance,
        x_ok,
        y_img,
        y_var,
        y_ok,
        factors,
        bg_terms,
        first_factors=first,
        constant_weight=cfg.constant_variance_weighting,
        reg=reg,
    )
    n = basis_images.shape[0]
    P = spatial.n_terms(cfg.spatial_kernel_order)
    coeffs = jnp.zeros((n, P), sdt).at[:, 0].set(theta[:n])
    kernel = SpatialKernel(basis_images, coeffs, prep.box, cfg.spatial_kernel_order, cfg.spatial_model_type)
    fit = pixel_fit_result(
        theta,
        stats["condition_number"],
        stats["residual_mean"],
        stats["residual_std"],
        theta[:1],
        CLIP_PASSES,
        (0, cfg.spatial_bg_order),  # a spatially constant kernel
    )
    extra = dict(n_fit_pixels=stats["n_fit_pixels"], n_clipped_pixels=stats["n_clipped_pixels"])
    return ImageFit(kernel, theta[n:], fit, basis_images, factors, widths, code, extra)
