"""Array type aliases and the working float dtype."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

Image = Float[Array, "ny nx"]
MaskImage = Int[Array, "ny nx"]
Kernel = Float[Array, "ky kx"]
Basis = Float[Array, "nbasis ky kx"]
Vector = Float[Array, " n"]
Scalar = Float[Array, ""]

__all__ = ["Array", "Bool", "Float", "Int", "Image", "MaskImage", "Kernel", "Basis", "Vector", "Scalar"]


def x64_enabled() -> bool:
    """Whether float64 is available right now (global flag or `jax.enable_x64` scope)."""
    return bool(jax.config.read("jax_enable_x64"))


def solve_dtype():
    """dtype of the small, precision-critical steps (normal equations, basis, filters)."""
    return jnp.float64 if x64_enabled() else jnp.float32


def float_dtype(x=None):
    """Floating dtype of an array (float32 for integer input)."""
    if x is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return jnp.result_type(x)
    return jnp.float32


def to_jax(x, dtype=None):
    """`x` as a jax array, of `dtype` if given. Host data (numpy arrays, Python numbers and lists) is converted by
    numpy and put on the device with `jax.device_put`: `jnp.asarray` of it, or a conversion or fill of a jax
    array, compiles a small program for each shape and dtype (five for an `Exposure` read from FITS), which a
    fresh process pays again. Jax arrays and tracers are converted with `astype`."""
    if isinstance(x, (jax.Array, jax.core.Tracer)):
        return x if dtype is None else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype))


def is_concrete(tree) -> bool:
    """True when no leaf of `tree` is a tracer (the values are known now, outside jit/vmap/grad tracing)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def select(flag, if_true, if_false):
    """`if_true` or `if_false` by a flag that is a Python bool (picked now, no cost) or a traced boolean scalar
    (picked leaf by leaf with `jnp.where`; both trees must have one structure). Used where a decision such as
    the subtraction mode is static for a fixed mode and decided inside the program for `mode="auto"`."""
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)
