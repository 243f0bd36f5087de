"""`eqx.filter_grad` through the subtraction equals central finite differences (float64, 1e-4 relative).

Scalars: Σ w·D and Σ D² of the difference image D. Inputs: template, science and variance pixels, the
`GaussianPsf.width` of each input and the kernel-source positions. PSF widths enter through the basis
widths, so the plan (kernel size) is made from concrete values and `jd.subtract` is called with the traced
exposures and that plan. Finite-difference steps are small enough to change no selection (stamps, rejection, rounding).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

RTOL = 1e-4


def _pair():
    # 192² so that the 3 × 3 cells give enough stamps for the order-2 spatial kernel (a smaller field leaves
    # the global normal matrix singular, and the pseudo-inverse is not differentiable there).
    # σ 1.6 → 2.6: the first basis width √(2.6² − 1.6²)/2 ≈ 1.02 is above its 0.7 floor, so the basis
    # (and the difference) depends on both PSF widths.
    return jd.sim.reference_pair(
        (192, 192),
        n_stars=60,
        seed=1,
        template_sigma=1.6,
        science_sigma=2.6,
        flux_range=(4000, 9000),
        template_border=8,
    )


def _objectives(config: jd.SubtractConfig):
    pair = _pair()
    template, science, sources = pair.template, pair.science, pair.sources
    plan = jd.make_plan(template, science, sources, config)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=science.shape))

    def scalars(args):
        """(Σ w·D, Σ D²) for traced (template, science, sources), with the plan of the concrete pair."""
        t, s, src = args
        d = jd.subtract(t, s, src, config, plan).difference.image
        return jnp.stack([jnp.sum(weights * d), jnp.sum(d * d)])

    args = (template, science, sources)
    jac = eqx.filter_jit(eqx.filter_jacrev(scalars))(args)
    return args, eqx.filter_jit(scalars), jac


def _tangent(args, leaf_of, direction):
    """A tangent pytree of `args` that is `direction` on one leaf and zero elsewhere (ints: None)."""
    zeros = jax.tree.map(lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else None, args)
    return eqx.tree_at(leaf_of, zeros, direction)


def _directional(jac, tangent):
    """Σ over leaves of ⟨∂f_i/∂leaf, tangent⟩ for both objectives i."""
    total = jnp.zeros(2)
    for g, t in zip(jax.tree.leaves(jac), jax.tree.leaves(tangent), strict=True):
        total = total + jnp.sum(g * t, axis=tuple(range(1, g.ndim)))
    return np.asarray(total)


def _check(args, f, jac, leaf_of, direction, eps):
    tangent = _tangent(args, leaf_of, direction)
    plus = eqx.apply_updates(args, jax.tree.map(lambda t: eps * t, tangent))
    minus = eqx.apply_updates(args, jax.tree.map(lambda t: -eps * t, tangent))
    fd = (np.asarray(f(plus)) - np.asarray(f(minus))) / (2 * eps)
    ad = _directional(jac, tangent)
    assert np.all(np.isfinite(ad)), ad
    assert np.all(np.abs(ad) > 0), f"zero gradient: {ad}"
    np.testing.assert_allclose(ad, fd, rtol=RTOL, atol=0)


def _safe_positions(x):
    """Direction on source coordinates, zero where a step could change a stamp centre's rounding."""
    frac = np.asarray(x) - np.floor(np.asarray(x))
    return jnp.asarray(np.where(np.abs(frac - 0.5) > 0.05, 1.0, 0.0))


# The default config (variance rescaling on) compiles a bigger program: about 50 s more, so it runs with `slow`.
@pytest.fixture(
    scope="module",
    params=[pytest.param(True, marks=pytest.mark.slow), False],
    ids=["scale_variance", "no_scale_variance"],
)
def problem(request):
    return _objectives(jd.SubtractConfig(do_scale_variance=request.param))


@pytest.mark.parametrize(
    "name, leaf_of, eps",
    [
        ("template pixels", lambda a: a[0].image, 1e-4),
        ("science pixels", lambda a: a[1].image, 1e-4),
        ("template variance", lambda a: a[0].variance, 1e-5),
        ("science variance", lambda a: a[1].variance, 1e-5),
        ("template PSF width", lambda a: a[0].psf.width, 1e-5),
        ("science PSF width", lambda a: a[1].psf.width, 1e-5),
    ],
)
def test_gradient_matches_finite_differences(problem, name, leaf_of, eps):
    args, f, jac = problem
    leaf = leaf_of(args)
    rng = np.random.default_rng(sum(map(ord, name)))
    direction = rng.normal(size=leaf.shape)
    if leaf.ndim == 2:
        # A few pixels only: medians, quantiles (variance rescaling, stamp weights) and clipped means are
        # piecewise linear in the pixels, and a dense step swaps order statistics, which no step size avoids.
        sparse = np.zeros(leaf.shape)
        sparse.flat[rng.choice(leaf.size, 40, replace=False)] = 1.0
        direction = direction * sparse
    direction = jnp.asarray(direction)
    if "variance" in name:
        direction = direction * leaf  # relative perturbation keeps every variance positive
    _check(args, f, jac, leaf_of, direction, eps)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_gradient_wrt_source_positions(problem, axis):
    args, f, jac = problem
    leaf_of = (lambda a: a[2].x) if axis == "x" else (lambda a: a[2].y)
    _check(args, f, jac, leaf_of, _safe_positions(leaf_of(args)), 1e-4)
