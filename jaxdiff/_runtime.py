"""Process-wide runtime settings, applied by the entry points (the task, the CLI, the LSST task, Dask workers),
never by the pure functions.

- **Persistent compilation cache.** Compiled programs are written to a per-user directory and reused by every
  later process, so a fresh process (a CLI call, an LSST quantum, a Dask worker) on an image size seen before
  does not compile again. The directory is `$JAXDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxdiff/xla`, else
  `~/.cache/jaxdiff/xla`; `JAXDIFF_CACHE_DIR=off` (or `0`, `none`, empty) disables it, and a cache directory
  the caller already gave JAX (`jax_compilation_cache_dir`) is left alone. A size limit turns on JAX's
  file-locked LRU cache, so concurrent processes can share the directory.
- **Exported programs** (`_programs`) in the same directory: a fresh process runs a core program it has run
  before without tracing and lowering it again (the persistent cache alone needs both to find the program).
- **One BLAS thread while jaxdiff runs on CPU.** jaxlib runs its LAPACK calls (QR, Cholesky, eigh) through the
  OpenBLAS of numpy/scipy, whose worker threads then spin on the cores XLA's own thread pool is using; jaxdiff's
  LAPACK calls are on matrices of a few hundred rows, where extra BLAS threads buy nothing.
- **Compiler scratch handed back.** glibc keeps the memory XLA's compiler frees mapped; trimming the heap after
  each compilation keeps it out of the peak of the run that follows.
- **Programs dropped before the process runs out of memory maps.** Each compiled program keeps its machine code
  in memory maps (about 1600 for a core program on a CPU) and Linux allows `vm.max_map_count` (65530 by default)
  per process, beyond which LLVM's next compilation aborts the process. When a compilation leaves the process
  above `MAP_FRACTION` of the limit, the next entry point call clears JAX's in-memory caches (compiled
  programs come back from the persistent cache when they are called again).
- **One pool of helper threads.** The task's host work beside its own main thread (the inputs' figures and the
  science cut-outs of the footprint figures while XLA runs, the template coverage while the PSF widths are
  measured) runs on two threads kept for the life of the process: a pool made and shut down per call let its
  threads exit just after the program finished, and their exit stalled the task's main thread for about 6 ms per
  call.
"""

import concurrent.futures
import contextlib
import ctypes
import gc
import os
import sys
from pathlib import Path

import jax
from jax import monitoring

from . import _programs

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay usable without it
    ThreadpoolController = None

CACHE_ENV = "JAXDIFF_CACHE_DIR"
CACHE_MAX_BYTES = 4 * 2**30
MIN_COMPILE_SECONDS = 0.1
_OFF = ("", "0", "off", "none", "false", "no")
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
MAP_FRACTION = 0.5
_entered = False
_near_map_limit = False
_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_blas: tuple[int, object] | None = None


def cache_dir() -> Path | None:
    """The persistent-cache directory jaxdiff uses, or None when `JAXDIFF_CACHE_DIR` turns it off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxdiff" / "xla"


def enable_persistent_cache() -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir()` unless the caller configured one already.

    Returns:
        The directory in use (the caller's, if set), or None when the cache is off.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # programs that compile in under MIN_COMPILE_SECONDS (eager operations, small helpers) are not stored: each
    # write of the size-limited cache scans the whole directory, and they cost no more to compile than to read
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    with contextlib.suppress(AttributeError, KeyError, RuntimeError):
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)  # LRU + file lock
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # JAX decides once whether to use the cache: decide again
    return str(path)


def enter() -> None:
    """What every entry point does on every call: once per process, the persistent cache and the listener that
    trims the heap after compiles; then, when a compilation left the process near its memory-map limit, drop
    the compiled programs held in memory."""
    global _entered, _near_map_limit
    if _near_map_limit:
        _near_map_limit = False
        free_compiled_programs()
    if _entered:
        return
    _entered = True
    enable_persistent_cache()
    _programs.enable(cache_dir())
    monitoring.register_event_duration_secs_listener(_after_compile)


def _after_compile(event: str, duration: float, **kwargs) -> None:
    global _near_map_limit
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        release_free_memory()
        limit, used = map_limit(), map_count()
        if limit and used and used > MAP_FRACTION * limit:
            _near_map_limit = True  # not cleared here: a compilation is in progress


def map_limit() -> int | None:
    """The kernel's memory-map limit per process (`vm.max_map_count`), or None where it cannot be read."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def map_count() -> int | None:
    """The memory maps this process holds, or None where /proc is missing."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def free_compiled_programs() -> None:
    """Drop every compiled program held in memory (JAX's caches and the loaded exported programs); calls
    compile again, from the persistent cache when it is on."""
    jax.clear_caches()
    _programs.forget()
    gc.collect()
    release_free_memory()


def helper_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's two helper threads for host work beside XLA (made on first use, and again in a forked
    child, where the parent's threads do not exist)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="jaxdiff"))
    return _pool[1]


def _blas_controller():
    """The BLAS libraries loaded in this process, found again only after new modules were imported (an import is
    how another BLAS gets loaded, e.g. scipy's): a fresh `threadpool_limits` scans every loaded library (2-25 ms
    per task call while XLA keeps the cores busy), a kept controller sets the limit in microseconds. numpy's
    OpenBLAS, the one jaxlib's LAPACK calls run on, is loaded before jaxdiff is."""
    global _blas
    if _blas is None or _blas[0] != len(sys.modules):
        _blas = (len(sys.modules), ThreadpoolController().select(user_api="blas"))
    return _blas[1]


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS libraries to one thread inside the block (CPU backend only; a no-op elsewhere)."""
    if ThreadpoolController is None or jax.default_backend() != "cpu":
        yield
        return
    with _blas_controller().limit(limits=1):
        yield


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc `malloc_trim`; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
