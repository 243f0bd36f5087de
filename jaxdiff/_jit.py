"""`dispatching_jit`: `eqx.filter_jit` that returns as soon as the program is dispatched.

`eqx.filter_jit` waits for every call's result (it blocks on a marker output so that equinox's runtime errors are
raised at the call). jaxdiff raises none inside its programs, and the wait takes from callers what JAX otherwise
gives them: a call that returns at once, so the host can read the next pair or prepare the next batch while XLA
computes this one.
"""

import functools
from typing import Any

import equinox as eqx
import jax


class _Static(eqx.Module):
    """A value carried through `jax.jit` as the output's structure (no array leaves)."""

    value: Any = eqx.field(static=True)


def dispatching_jit(fun, **jit_kwargs):
    """`fun` compiled with its arguments' array leaves as the program's inputs and every other leaf static (as
    `eqx.filter_jit`); the outputs' non-array leaves come back as they were traced.

    Arguments:
        fun: a function of pytrees whose non-array leaves are hashable.
        jit_kwargs: passed to `jax.jit` (e.g. `compiler_options`).
    """

    @functools.partial(jax.jit, static_argnums=(1,), **jit_kwargs)
    def run(arrays, structure):
        tree, fixed = structure
        leaves = iter(arrays)
        args = jax.tree.unflatten(tree, [next(leaves) if f is _ARRAY else f for f in fixed])
        dynamic, static = eqx.partition(fun(*args), eqx.is_array)
        return dynamic, _Static(static)

    @functools.wraps(fun)
    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        arrays = [leaf for leaf in leaves if eqx.is_array(leaf)]
        fixed = tuple(_ARRAY if eqx.is_array(leaf) else leaf for leaf in leaves)
        dynamic, static = run(arrays, (tree, fixed))
        return eqx.combine(dynamic, static.value)

    return call


class _ArrayMarker:
    """Stands for an array leaf in the static part of the arguments."""

    def __repr__(self) -> str:
        return "<array>"


_ARRAY = _ArrayMarker()
