"""Runtime hygiene on CPU: BLAS worker threads that compete with XLA's thread pool, and compiler scratch memory.

jaxlib runs LAPACK custom calls (QR, Cholesky, triangular solves, eigh) through the OpenBLAS that numpy and
scipy ship. After such a call OpenBLAS's worker threads spin-wait for more work, on the cores that XLA's thread
pool is using for everything else: on the 2-core development machine a 2048² subtraction took 0.65 s with two
OpenBLAS threads and 0.52 s with one (the LAPACK calls of jaxdiff are on matrices of at most a few hundred rows,
where extra BLAS threads buy nothing). So the entry points run with BLAS limited to one thread, by
`threadpoolctl` when it is installed, and restore the caller's setting afterwards.
"""

import collections
import contextlib
import ctypes
import sys

import jax

from ._types import is_concrete

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay usable without it
    threadpool_limits = None


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS libraries to one thread inside the block (CPU backend only; a no-op elsewhere)."""
    if threadpool_limits is None or jax.default_backend() != "cpu":
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


_COMPILED: "collections.OrderedDict" = collections.OrderedDict()
_MAX_COMPILED = 8


def _signature(tree):
    """Hashable key of a call: tree structure, array shapes/dtypes/shardings, and every other leaf itself."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = []
    for x in leaves:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            parts.append(
                (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), str(getattr(x, "sharding", "")))
            )
        else:
            parts.append(("static", x))
    key = (treedef, tuple(parts))
    hash(key)  # TypeError for unhashable static leaves
    return key


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc `malloc_trim`; elsewhere a no-op).

    XLA's compiler frees its scratch memory after compiling, but glibc keeps it mapped: at 4096² the resident
    size stayed 360 MB higher after the first call than the memory in use. Trimming once after each new
    compilation keeps that out of the peak of the runs that follow.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def run_blocking(fn, *args):
    """`fn(*args)` (an `eqx.filter_jit` function) with BLAS single-threaded, waiting for a concrete result (the
    limit must hold while XLA executes, which is asynchronous); traced calls (under jit or vmap) just return.

    A first call with new shapes or static arguments is compiled ahead of time and followed by
    `release_free_memory` before it runs, so the compiler's scratch memory is not part of the run's peak
    (4096²: 2471 → 2109 MiB when introduced). Compiled programs are kept for the last 8 signatures.
    """
    if not is_concrete(args):
        return fn(*args)
    try:
        key = (fn, _signature(args))
    except TypeError:
        key = None
    compiled = None if key is None else _COMPILED.get(key)
    if compiled is None and key is not None and hasattr(fn, "lower"):
        compiled = fn.lower(*args).compile()
        release_free_memory()
        _COMPILED[key] = compiled
        while len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    elif compiled is not None:
        _COMPILED.move_to_end(key)
    with single_threaded_blas():
        return jax.block_until_ready((compiled or fn)(*args))
