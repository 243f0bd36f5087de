"""Kernel fit on stamps: per-stamp fits, rejection loop and the global spatial solve (ALGORITHM §7–8)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from . import stamps as _stamps
from ._stats import clipped_mean_std
from ._types import Array, Float
from .solvers import symmetric_solve
from .solvers._normal import (
    determined_terms_of_sets,
    global_normal,
    lifted_mean,
    residual_stats,
    restrict,
    stamp_alphas,
    stamp_designs,
    stamp_normal,
    stamp_spectrum,
    theta_mask,
)


class StampData(eqx.Module):
    """Everything the fit needs about the N stamp slots (all arrays, leading axis N)."""

    x_stamp: Float[Array, "N s s"]  # convolved image X on the (2k+1)² stamp
    vx_stamp: Float[Array, "N s s"]
    y_core: Float[Array, "N c c"]  # matched image Y on the core
    vy_core: Float[Array, "N c c"]
    good_core: Array  # (N, c, c) bool: pixels counted in residual tests
    weight: Array  # (N,) stamp weights 1/median(V_X + V_Y)
    p: Array  # (N, P) kernel spatial terms at the sources
    q: Array  # (N, Q) background terms at the sources
    cx: Array  # (N,) centres, array coordinates
    cy: Array
    valid: Array  # (N,) bool
    # the residual tests' precision: the convolved image's own (a float32 image's stamps hold float32 data)
    test_dtype: object = eqx.field(static=True)


class FitResult(eqx.Module):
    theta: Array
    condition_number: Array
    active: Array  # (N,) bool, stamps in the final solve
    passed_single: Array
    n_iterations: Array
    n_rejected_single: Array
    n_rejected_ksum: Array
    n_rejected_spatial: Array
    residual_mean: Array
    residual_std: Array
    stamp_kernel_sums: Array
    # the spatial orders solved for: the configured ones unless the surviving stamps cannot determine them
    # (too few, or on a line: `determined_terms`)
    kernel_order_used: Array
    bg_order_used: Array


def pixel_fit_result(theta, condition_number, residual_mean, residual_std, kernel_sum, n_passes: int, orders):
    """The `FitResult` of a fit on every usable pixel (no stamps): the whole-image fit and the fit with a given
    kernel. `kernel_sum`: shape (1,); `n_passes`: its clipping passes; `orders`: the (kernel, background) spatial
    orders fitted."""
    zero = jnp.zeros((), jnp.int32)
    return FitResult(
        theta=theta,
        condition_number=condition_number,
        active=jnp.zeros((1,), bool),
        passed_single=jnp.zeros((1,), bool),
        n_iterations=jnp.asarray(n_passes, jnp.int32),
        n_rejected_single=zero,
        n_rejected_ksum=zero,
        n_rejected_spatial=zero,
        residual_mean=residual_mean,
        residual_std=residual_std,
        stamp_kernel_sums=kernel_sum,
        kernel_order_used=jnp.asarray(orders[0], jnp.int32),
        bg_order_used=jnp.asarray(orders[1], jnp.int32),
    )


def fit_kernel(data: StampData, basis, factors, solver, cfg, reg=None, axis_name: str | None = None) -> FitResult:
    """Fit the spatial kernel and background from stamps.

    Arguments:
        data: the stamp slots.
        basis: (n, k, k) basis images.
        factors: (fx, fy, mix[, x_groups]), the separable form of the same basis (see `stamp_designs`).
        solver: `LeastSquares` or `OptaxSolver` for the global system.
        cfg: `SubtractConfig` (static numbers: cell size, stars per cell, thresholds, iterations).
        reg: optional (n + 1, n + 1) penalty added to every per-stamp normal matrix (delta-function
            regularisation, ALGORITHM §5.3).
        axis_name: the vmap axis name when the fit runs for a batch (see `stamps.over_slots`).
    """
    n = basis.shape[0]
    N = data.valid.shape[0]
    dtype = data.x_stamp.dtype
    fx, fy, mix, *groups = factors

    valid = data.valid

    def normal(x_stamp, y_core, weight):  # the designs C_b = B_b ∗ X live only inside their chunk
        return jax.vmap(stamp_normal)(stamp_designs(x_stamp, fx, fy, mix, *groups), y_core, weight)

    # chunks of slots without a star are skipped: the work follows the star count, not the slot count
    Ms, bs = _stamps.over_slots(
        normal, valid, data.x_stamp, data.y_core, data.weight.astype(dtype), axis_name=axis_name
    )
    if reg is not None:
        Ms = Ms + reg.astype(dtype)
    Ms = jnp.where(valid[:, None, None], Ms, jnp.eye(n + 1, dtype=dtype))
    bs = jnp.where(valid[:, None], bs, 0.0)

    k = basis.shape[-1]

    def spectra(x_stamp, vx_stamp):
        # reused by every residual test, at the image's precision (the normal equations keep the solve dtype);
        # float32 is plenty for the K² ∗ V_X term that only scales the residuals
        return stamp_spectrum(x_stamp.astype(data.test_dtype), k), stamp_spectrum(vx_stamp.astype(jnp.float32), k)

    x_spec, vx_spec = _stamps.over_slots(jax.vmap(spectra), valid, data.x_stamp, data.vx_stamp, axis_name=axis_name)

    def one_test(xs, yc, vyc, vxs, x_sp, vx_sp, g, a):
        return residual_stats(xs, yc, vyc, vxs, g, a, basis, (x_sp, vx_sp))

    def test(alpha):
        # slots of a skipped chunk get NaN statistics: they fail every test (and are invalid anyway)
        return _stamps.over_slots(
            jax.vmap(one_test),
            valid,
            data.x_stamp,
            data.y_core,
            data.vy_core,
            data.vx_stamp,
            x_spec,
            vx_spec,
            data.good_core,
            alpha,
            fill=jnp.nan,
            axis_name=axis_name,
        )

    def passes(stats):
        mean, std = stats
        ok = jnp.isfinite(mean) & jnp.isfinite(std)
        return ok & (jnp.abs(mean) <= cfg.candidate_residual_mean_max) & (std <= cfg.candidate_residual_std_max)

    alpha_single = symmetric_solve(Ms, bs)
    ksum = alpha_single[:, 0]

    p_sg, q_sg = lax.stop_gradient(data.p), lax.stop_gradient(data.q)
    priority = jnp.arange(N)  # slots are packed brightest first

    def active_set(rejected, passed_single):
        eligible = passed_single & ~rejected
        rank = _stamps.cell_rank(data.cx, data.cy, priority, eligible, cfg.size_cell)
        return eligible & (rank < cfg.n_star_per_cell)

    # The rejection loop decides the selection only; gradients flow through the final solve.
    Ms_sg, bs_sg = lax.stop_gradient(Ms), lax.stop_gradient(bs)
    ksum_sg, alpha_single_sg = lax.stop_gradient((ksum, alpha_single))

    P, Q = data.p.shape[-1], data.q.shape[-1]

    def determined(active):
        """The θ entries the active stamps determine, and the kernel and background orders they keep."""
        w = active.astype(dtype)
        (kept_p, order_p), (kept_q, order_q) = determined_terms_of_sets([(data.p, w, P), (data.q, w, Q)])
        return theta_mask(n, P, Q, kept_p, kept_q), order_p, order_q

    def solve_sg(active):
        M, b = global_normal(Ms_sg, bs_sg, p_sg, q_sg, active.astype(dtype))
        mask = determined(active)[0]
        return symmetric_solve(restrict(M, mask), jnp.where(mask, b, 0.0))

    # Kernel-sum clipping (cheap, on the stamps' sums) runs to convergence before every spatial test (a global
    # solve and a residual test of every stamp): a rejection can promote a replacement star into its cell, so
    # the two alternate. Under `vmap` the outer loop runs until the slowest pair is done, but the costly spatial
    # step runs once per outer pass, not once per clipping pass as a `lax.cond` inside one loop would.
    def clip_ksum(rejected, n_k, passed_single):
        def body(state):
            rejected, n_k, _ = state
            active = active_set(rejected, passed_single)
            mu, sigma, _ = clipped_mean_std(ksum_sg, active)
            clip = active & (jnp.abs(ksum_sg - mu) > cfg.max_ksum_sigma * sigma)
            return rejected | clip, n_k + jnp.sum(clip, dtype=jnp.int32), jnp.any(clip)

        rejected, n_k, _ = lax.while_loop(lambda state: state[2], body, (rejected, n_k, jnp.array(True)))
        return rejected, n_k

    # The loop's first pass is the single-stamp test (each stamp's own solution α_s); every later pass clips,
    # solves the spatial system and tests its α_s. Both share one compiled residual test (the final test after
    # the loop is the other): the test is the fit's largest piece of code.
    def rejection_pass(state):
        rejected, it, _, n_k, n_s, passed_single, first = state

        def spatial():
            rejected_k, n_k_k = clip_ksum(rejected, n_k, passed_single)
            active = active_set(rejected_k, passed_single)
            return rejected_k, n_k_k, active, stamp_alphas(solve_sg(active), p_sg, q_sg, n)

        rejected, n_k, active, alphas = lax.cond(first, lambda: (rejected, n_k, valid, alpha_single_sg), spatial)
        ok = passes(test(alphas))
        passed_single = jnp.where(first, valid & ok, passed_single)
        bad = active & ~ok & ~first
        it1 = it + jnp.any(bad).astype(jnp.int32)
        # no active star left: nothing to test (clipping empties the set only when every star is rejected)
        finished = ~first & (~jnp.any(bad) | (it1 >= cfg.max_spatial_iterations) | ~jnp.any(active))
        return rejected | bad, it1, finished, n_k, n_s + jnp.sum(bad, dtype=jnp.int32), passed_single, False

    zero = jnp.array(0, jnp.int32)
    init = (~valid, zero, jnp.array(False), zero, zero, valid, jnp.array(True))
    rejected, n_iter, _, n_k, n_s, passed_single, _ = lax.while_loop(lambda state: ~state[2], rejection_pass, init)
    active = lax.stop_gradient(active_set(rejected, passed_single))

    M, b = global_normal(Ms, bs, data.p, data.q, active.astype(dtype))
    precond = _preconditioner(Ms, data.p, data.q, active.astype(dtype))
    mask, order_p, order_q = determined(active)
    theta, cond_number = solver.solve(restrict(M, mask), jnp.where(mask, b, 0.0), restrict(precond, mask))
    alphas = stamp_alphas(theta, data.p, data.q, n)
    mean, std = test(lax.stop_gradient(alphas))
    used = active & jnp.isfinite(mean) & jnp.isfinite(std)
    n_used = jnp.maximum(jnp.sum(used), 1)
    return FitResult(
        theta=theta,
        condition_number=cond_number,
        active=active,
        passed_single=passed_single,
        n_iterations=n_iter,
        n_rejected_single=jnp.sum(valid & ~passed_single),
        n_rejected_ksum=n_k,
        n_rejected_spatial=n_s,
        residual_mean=jnp.sum(jnp.where(used, mean, 0.0)) / n_used,
        residual_std=jnp.sqrt(jnp.sum(jnp.where(used, std**2, 0.0)) / n_used),
        stamp_kernel_sums=ksum,
        kernel_order_used=order_p,
        bg_order_used=order_q,
    )


def _preconditioner(Ms, p, q, weights):
    """A = Σ_s τ_s E_sᵀ Ḡ E_s with Ḡ = Σ_s M_s / Σ_s τ_s, τ_s = trace M_s (ALGORITHM §8.3)."""
    tau = jnp.trace(Ms, axis1=1, axis2=2) * weights
    G = jnp.einsum("s,sij->ij", weights, Ms) / jnp.maximum(jnp.sum(tau), 1e-300)
    return lifted_mean(G, tau, p, q)
