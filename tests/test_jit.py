"""`dispatching_jit`: the core's jit returns once the program is dispatched, with `eqx.filter_jit`'s results."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from jaxdiff._jit import dispatching_jit


class _Box(eqx.Module):
    values: jax.Array
    scale: float
    name: str = eqx.field(static=True)


def _scaled(box: _Box, offset, label: str):
    return _Box(box.values * box.scale + offset, box.scale, f"{box.name}-{label}"), {"label": label, "n": 3}


def test_results_and_static_leaves_are_those_of_filter_jit():
    box = _Box(jnp.arange(4.0), 2.0, "a")
    got = dispatching_jit(_scaled)(box, jnp.asarray(1.5), "x")
    want = eqx.filter_jit(_scaled)(box, jnp.asarray(1.5), "x")
    np.testing.assert_array_equal(got[0].values, want[0].values)
    assert (got[0].scale, got[0].name, got[1]) == (want[0].scale, want[0].name, want[1]) == (2.0, "a-x", want[1])


def test_a_new_static_value_compiles_a_new_program_and_arrays_do_not():
    traces = []

    def f(x, k: int):
        traces.append(k)
        return x * k

    g = dispatching_jit(f)
    for x, k in ((jnp.ones(3), 2), (jnp.zeros(3), 2), (jnp.ones(3), 3)):
        np.testing.assert_array_equal(g(x, k), np.asarray(x) * k)
    assert traces == [2, 3]


def _slow(x):
    # ~0.5 s of dependent matrix products on the 2-core development machine
    return jax.lax.fori_loop(0, 400, lambda i, a: jnp.tanh(a @ a), x)


def test_the_call_returns_before_the_program_finishes():
    g = dispatching_jit(_slow)
    x = jnp.full((300, 300), 1e-3)
    jax.block_until_ready(g(x))  # compiled
    out = g(x)
    # a call that waited for its result (as eqx.filter_jit does) returns a finished array
    assert not out.is_ready()
    jax.block_until_ready(out)
    assert eqx.filter_jit(_slow)(x).is_ready()


def test_works_under_jit_vmap_grad_and_disable_jit():
    g = dispatching_jit(lambda x, k: jnp.sum(jnp.sin(x) * k))
    x = jnp.linspace(0.0, 1.0, 5)
    want = float(jnp.sum(jnp.sin(x) * 2.0))
    assert float(jax.jit(lambda v: g(v, 2.0))(x)) == want
    np.testing.assert_allclose(jax.vmap(lambda v: g(v, 2.0))(jnp.stack([x, x])), [want, want])
    np.testing.assert_allclose(jax.grad(lambda v: g(v, 2.0))(x), 2.0 * jnp.cos(x), rtol=1e-6)
    with jax.disable_jit():
        assert float(g(x, 2.0)) == want


def test_subtract_gives_what_it_gives_under_filter_jit():
    pair = jd.sim.simulate_pair((128, 128), seed=3, n_stars=40)
    config = jd.SubtractConfig()
    plan = jd.make_plan(pair.template, pair.science, pair.sources, config)
    got = jd.subtract(pair.template, pair.science, pair.sources, config, plan)
    want = eqx.filter_jit(jd.subtract)(pair.template, pair.science, pair.sources, config, plan)
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(got.difference, name), getattr(want.difference, name))
    assert got.difference.mask_planes == want.difference.mask_planes
    assert got.metadata.keys() == want.metadata.keys()
    for key, value in want.metadata.items():
        np.testing.assert_array_equal(got.metadata[key], value, err_msg=key)
