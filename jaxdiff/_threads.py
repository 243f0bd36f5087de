"""Keep BLAS worker threads from competing with XLA's own thread pool on CPU.

jaxlib runs LAPACK custom calls (QR, Cholesky, triangular solves, eigh) through the OpenBLAS that numpy and
scipy ship. After such a call OpenBLAS's worker threads spin-wait for more work, on the cores that XLA's thread
pool is using for everything else: on the 2-core development machine a 2048² subtraction took 0.65 s with two
OpenBLAS threads and 0.52 s with one (the LAPACK calls of jaxdiff are on matrices of at most a few hundred rows,
where extra BLAS threads buy nothing). So the entry points run with BLAS limited to one thread, by
`threadpoolctl` when it is installed, and restore the caller's setting afterwards.
"""

import contextlib

import jax

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay usable without it
    threadpool_limits = None


def _concrete(tree) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS libraries to one thread inside the block (CPU backend only; a no-op elsewhere)."""
    if threadpool_limits is None or jax.default_backend() != "cpu":
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def run_blocking(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with BLAS single-threaded, waiting for the result when it is concrete (the limit
    must hold while XLA executes, which is asynchronous); traced calls (under jit or vmap) just return."""
    if not _concrete((args, kwargs)):
        return fn(*args, **kwargs)
    with single_threaded_blas():
        return jax.block_until_ready(fn(*args, **kwargs))
