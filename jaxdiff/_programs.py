"""A store of exported programs, so that a fresh process neither traces nor lowers a program it has run before.

JAX's persistent compilation cache (see `_runtime`) saves XLA's compilation, but to find a program in it JAX
must first trace the Python function and lower it to StableHLO, because the cache key is computed from the
lowered module: for the 1024² core on 2 cores that is about 1.4 s, three times a warm subtraction. The store
keeps every core program it runs in its exported form (`jax.export`, serialized StableHLO) together with the
structure of its outputs, under a key made of everything that decides the program:

- the function, the configuration and the plan (their reprs);
- the structure of the inputs (the pytree definition with its static fields) and each leaf's shape and dtype;
- the jaxdiff source (a hash of the package's files), the jax and jaxlib versions, the backend and its device
  kind, the x64 flag and the other JAX settings that change a traced program, and `XLA_FLAGS`.

A process that finds a program deserializes it and calls it; that call's compilation then reads the persistent
compilation cache. Results are those of the traced program (a test compares them). The store is used only by
calls with concrete inputs outside `jax.disable_jit()`, after an entry point (task, CLI, LSST task, Dask worker)
has turned it on; a call whose configuration has no stable repr (an object printed with its address) skips it.
Files are written atomically (a temporary file, then a rename), so concurrent processes can share the directory;
beyond `MAX_FILES` the least recently used are removed. A file is code the process will run: share a cache
directory only with users you trust.
"""

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import pickle
import re
import tempfile
from pathlib import Path

import equinox as eqx
import jax

FORMAT = 1
SUFFIX = ".jaxdiff-program"
MAX_FILES = 256
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# JAX settings that change what a traced program computes
_CONFIG_IN_KEY = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
    "jax_default_prng_impl",
)

_directory: Path | None = None
_loaded: dict = {}  # key -> (jitted call of the exported program, output template)


def enable(directory) -> None:
    """Store programs in `directory` (created if missing); None turns the store off."""
    global _directory
    _directory = None if directory is None else Path(directory)
    _loaded.clear()


def forget() -> None:
    """Drop the programs loaded in this process (their files stay)."""
    _loaded.clear()


def directory() -> Path | None:
    """The store's directory, or None when it is off."""
    return _directory


@functools.cache
def _source_hash() -> str:
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _environment() -> str:
    device = jax.devices()[0]
    return repr(
        (
            FORMAT,
            _source_hash(),
            jax.__version__,
            importlib.metadata.version("jaxlib"),
            device.platform,
            device.device_kind,
            jax.device_count(),
        )
    )


def _describe(leaf) -> str:
    if eqx.is_array(leaf):
        return f"{leaf.shape}{leaf.dtype}{'w' if getattr(leaf, 'weak_type', False) else ''}"
    return f"{type(leaf).__qualname__}:{leaf!r}"


def _key(name: str, inputs, static) -> str | None:
    leaves, tree = jax.tree.flatten(inputs)
    text = repr(
        (
            _environment(),
            [getattr(jax.config, setting, None) for setting in _CONFIG_IN_KEY],
            os.environ.get("XLA_FLAGS", ""),
            name,
            static,
            tree,
            [_describe(leaf) for leaf in leaves],
        )
    )
    if _ADDRESS.search(text):  # an object without a stable repr: no key that holds across processes
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _usable(inputs) -> bool:
    if _directory is None or jax.config.jax_disable_jit:
        return False
    return all(not isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(inputs))


def call(name: str, fun, inputs: tuple, *static, compiler_options: dict | None = None):
    """`fun(*inputs, *static)` through the store, or None when the store cannot serve this call.

    Arguments:
        name: identifies `fun` in the key (e.g. "core").
        fun: the traceable function (not jitted).
        inputs: a tuple of pytrees; their array leaves are the program's arguments, everything else is static.
        static: hashable values with stable reprs (configuration, plan).
        compiler_options: XLA options the program is compiled with (part of the key).
    """
    if not _usable(inputs):
        return None
    options = dict(compiler_options or {})
    key = _key(name, inputs, (*static, sorted(options.items())))
    if key is None:
        return None
    dynamic, fixed = eqx.partition(inputs, eqx.is_array)
    leaves, tree = jax.tree.flatten(dynamic)
    entry = _loaded.get(key)
    if entry is None:
        entry = _read(key)
        if entry is None:
            try:
                entry = _export(fun, tree, fixed, static, leaves)
            except Exception:  # noqa: BLE001 - not exportable (e.g. a custom call without a stable form)
                entry = None  # the traced path runs it (and raises whatever tracing raises)
            else:
                _write(key, entry)
        if entry is None:
            entry = False
        else:
            exported, template = entry
            entry = (_program(name, exported, options), template)
        _loaded[key] = entry
    if entry is False:
        return None
    program, template = entry
    outputs = iter(program(*leaves))
    return jax.tree.map(lambda x: next(outputs) if isinstance(x, jax.ShapeDtypeStruct) else x, template)


def _export(fun, tree, fixed, static, leaves):
    templates = []

    def flat(*args):
        out = fun(*eqx.combine(jax.tree.unflatten(tree, args), fixed), *static)
        templates.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x, out))
        return [x for x in jax.tree.leaves(out) if eqx.is_array(x)]

    exported = jax.export.export(jax.jit(flat))(*leaves)
    return (exported, templates[0])


def _path(key: str) -> Path:
    return _directory / f"{key}{SUFFIX}"


def _program(name: str, exported, options: dict):
    """The jitted call of an exported program, named after the function (as compile events and profiles show)."""

    def program(*args):
        return exported.call(*args)

    program.__name__ = program.__qualname__ = name
    return jax.jit(program, compiler_options=options or None)


def _read(key: str):
    """(exported program, output template) from the store's file, or None."""
    path = _path(key)
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        serialized, template = pickle.loads(blob)
        exported = jax.export.deserialize(bytearray(serialized))
    except Exception:  # noqa: BLE001 - a damaged or foreign file: ignore it, it is rewritten
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used
    return (exported, template)


def _write(key: str, entry) -> None:
    """Store (exported program, output template) atomically; an output that does not pickle or a read-only or full
    disk leaves it unstored."""
    exported, template = entry
    try:
        blob = pickle.dumps((exported.serialize(), template))
    except Exception:  # noqa: BLE001 - an output that does not pickle: run without storing it
        return
    try:
        _directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=_directory, suffix=".tmp", delete=False) as f:
            f.write(blob)
        os.replace(f.name, _path(key))
        _prune()
    except OSError:  # a read-only or full disk: run without storing
        pass


def _prune() -> None:
    files = []
    for path in _directory.glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):
            files.append((path.stat().st_mtime, path))
    for _, path in sorted(files)[: max(0, len(files) - MAX_FILES)]:
        with contextlib.suppress(OSError):
            path.unlink()
