"""Many subtractions: stacked pairs in one program (vmapped; a loop on one CPU device), device-sized batches
(sharded over all devices), Dask.

Pairs of one call must share image shapes and mask-plane tables; their PSFs, source counts and coverage may
differ. One plan serves the whole call: sources are padded to one capacity, image PSFs to one side, and the
kernel size is the largest any pair needs; the mode (under `mode="auto"`) and the basis widths are decided per
pair inside the program, so every pair gets what a single `jd.subtract` call would give it.
"""

import dataclasses
import os
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _programs
from . import _runtime as runtime
from ._config import SubtractConfig
from ._errors import RESULTS
from ._exposure import Exposure
from ._io import read_exposure, write_exposure
from ._jit import dispatching_jit
from ._plan import Plan, make_plan, with_slots_for
from ._result import SubtractResult
from ._sources import Sources
from ._subtract import core, core_inputs, restore_wcs

_AXIS = "pairs"
_PER_DEVICE = 4  # default pairs per device and batch: enough to amortise dispatch, small in memory


def stack(items: Sequence):
    """Stack pytrees of one structure (exposures, sources, results) along a new leading axis.

    Arguments:
        items: a non-empty sequence of pytrees with identical structure and leaf shapes; exposures must not
            carry a WCS (static fields must be equal), see `subtract_batch`, which strips it.

    Returns:
        One pytree whose leaves have a leading axis of length `len(items)`.
    """
    if len(items) == 0:
        raise ValueError("stack needs at least one item, got an empty sequence")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


def unstack(tree, n: int) -> list:
    """The inverse of `stack`: `n` pytrees, item i holding index i of every leaf."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _sequential() -> bool:
    """Whether a batch runs its pairs one after another inside the compiled program (`lax.map`) instead of side by
    side (`vmap`): on a single CPU device. There a vmapped batch gains nothing from width and loses on each pair
    (8 different 1024² pairs, 2 cores: 1.38× the time of single calls; every pair runs the stamp work and the
    rejection passes the batch's most demanding pair needs, and 8× larger arrays fall out of the caches), while
    in a loop each pair costs what its single call costs. Accelerators, and several devices, get the vmap."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _batched(
    templates: Exposure,
    sciences: Exposure,
    sources: Sources,
    config: SubtractConfig,
    plan: Plan,
    sequential: bool = False,
):
    if sequential:
        inputs, fixed = eqx.partition((templates, sciences, sources), eqx.is_array)
        static = []

        def one(pair):
            out = core(*eqx.combine(pair, fixed), config, plan)
            dynamic, rest = eqx.partition(out, eqx.is_array)
            static.append(rest)
            return dynamic

        return eqx.combine(jax.lax.map(one, inputs), static[0])
    # the named axis lets the stamp work skip what no pair of the batch needs (see `stamps.over_slots`)
    batched = eqx.filter_vmap(
        lambda t, s, src: core(t, s, src, config, plan, _AXIS), in_axes=(0, 0, 0), axis_name=_AXIS
    )
    return batched(templates, sciences, sources)


_batched_core = dispatching_jit(_batched)


def _run_batch(batch: tuple, config: SubtractConfig, plan: Plan):
    """The batched core on a stacked batch; on one CPU device through the store of exported programs, so that a
    fresh process (a Dask worker) does not trace it again (see `jaxdiff._programs`)."""
    sequential = _sequential()
    result = _programs.call("batch", _batched, batch, config, plan, sequential) if sequential else None
    return _batched_core(*batch, config, plan, sequential) if result is None else result


def subtract_batch(
    templates: Exposure,
    sciences: Exposure,
    sources: Sources,
    config: SubtractConfig | None = None,
    plan: Plan | None = None,
) -> SubtractResult:
    """`jd.subtract` over stacked pairs of one shape in one compiled program (one compilation per shape and plan).

    On accelerators (and several devices) the pairs are vmapped; on a single CPU device they run one after
    another inside the program, where that is faster (see the batches guide). Either way each pair gets what
    its single call gives it.

    Arguments:
        templates, sciences: exposures stacked with `stack` (leading axis B, no WCS).
        sources: stacked `Sources` (B, n).
        config: a `SubtractConfig` shared by all pairs (default: LSST's defaults).
        plan: the static plan (default: `jd.make_plan` of the stacked inputs, which serves every pair).

    Returns:
        A `SubtractResult` whose leaves have a leading axis B; `metadata` holds (B,) arrays. When B is a
        multiple of the device count, the batch axis is sharded over all devices (as in `run_many`).
    """
    config = SubtractConfig() if config is None else config
    plan = make_plan(templates, sciences, sources, config) if plan is None else plan
    batch = core_inputs(templates, sciences, sources, psf_size=plan.psf_size, capacity=plan.capacity)
    if templates.image.shape[0] % jax.device_count() == 0:
        batch = jax.device_put(batch, _sharding())
    return _batched_core(*batch, config, plan, _sequential())


def plan_for_pairs(pairs: Sequence[tuple[Exposure, Exposure, Sources]], config: SubtractConfig) -> Plan:
    """One plan that serves every pair: the largest kernel size, source capacity and PSF side any pair needs, and
    stamp slots for the largest number of valid sources (see `jd.make_plan`)."""
    if len(pairs) == 0:
        raise ValueError("a batch needs at least one (template, science, sources) pair, got none")
    plans = [make_plan(t, s, src, config) for t, s, src in pairs]
    sizes = [p.psf_size for p in plans]
    plan = dataclasses.replace(
        plans[0],
        k=max(p.k for p in plans),
        n_slots=max(p.n_slots for p in plans),
        capacity=max(p.capacity for p in plans),
        psf_size=None if None in sizes else max(sizes),
    )
    return with_slots_for(plan, max(src.n_valid for _, _, src in pairs))


def stack_pairs(
    pairs: Sequence[tuple[Exposure, Exposure, Sources]], config: SubtractConfig | None = None, plan: Plan | None = None
) -> tuple[tuple[Exposure, Exposure, Sources], Plan]:
    """Stack (template, science, sources) triples with different PSFs and source counts into one batch.

    Every pair is brought to one layout first (sources padded to the plan's capacity, image PSFs to its PSF
    side), which `stack` alone cannot do when the PSF images or source lists differ in size.

    Arguments:
        pairs: triples of one image shape and mask-plane table.
        config: a `SubtractConfig` (default: LSST's defaults); used for the plan only.
        plan: the plan to stack for (default: `plan_for_pairs(pairs, config)`, which serves every pair).

    Returns:
        `((templates, sciences, sources), plan)`: the stacked batch, ready for `subtract_batch(*batch, config,
        plan)` (or a `jax.jit`/`jax.vmap` of your own), and the plan it was stacked for.
    """
    config = SubtractConfig() if config is None else config
    pairs = list(pairs)
    plan = plan_for_pairs(pairs, config) if plan is None else plan
    prepared = _prepared(pairs, plan)
    return tuple(stack([p[j] for p in prepared]) for j in range(3)), plan


def _prepared(pairs: list, plan: Plan) -> list:
    prepared = [core_inputs(t, s, src, psf_size=plan.psf_size, capacity=plan.capacity) for t, s, src in pairs]
    _check_layout(prepared)
    return prepared


def _check_layout(prepared) -> None:
    ref = jax.tree.structure(prepared[0])
    shapes = [np.shape(x) for x in jax.tree.leaves(prepared[0])]
    for i, tree in enumerate(prepared):
        if jax.tree.structure(tree) != ref or [np.shape(x) for x in jax.tree.leaves(tree)] != shapes:
            raise ValueError(
                f"pair {i} differs from pair 0 in image shape, mask planes or PSF model type; "
                "run pairs of different layouts in separate run_many calls"
            )


def _sharding() -> NamedSharding:
    mesh = Mesh(np.asarray(jax.devices()), (_AXIS,))
    return NamedSharding(mesh, PartitionSpec(_AXIS))


def run_many(
    pairs: Sequence[tuple[Exposure, Exposure, Sources]],
    config: SubtractConfig | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[SubtractResult]:
    """Subtract a long list of pairs in device-sized batches, sharded over all local devices.

    Each batch is stacked, placed with a `NamedSharding` that splits the batch axis over a 1-D mesh of
    `jax.devices()` (one device: the same code, nothing split) and run by one compiled, vmapped core. The last
    batch is padded with copies of the last pair, so every batch has the same shape and nothing recompiles.

    Arguments:
        pairs: (template, science, sources) triples of one layout (see the module docstring).
        config: a `SubtractConfig` shared by all pairs (default: LSST's defaults).
        batch_size: pairs per batch, rounded up to a multiple of the device count (default: 4 per device).
        progress: show a tqdm progress bar (in pairs).

    Returns:
        One `SubtractResult` per pair, in order, with numpy leaves (fetched once per batch) and the science
        WCS restored on `difference` and `matched_template`; `metadata` holds 0-d numpy arrays.
    """
    from tqdm.auto import tqdm

    runtime.enter()
    pairs = list(pairs)
    config = SubtractConfig() if config is None else config
    plan = plan_for_pairs(pairs, config)
    prepared = _prepared(pairs, plan)
    n_dev = jax.device_count()
    size = _PER_DEVICE * n_dev if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    size = -(-size // n_dev) * n_dev
    sharding = _sharding()
    results = []
    with tqdm(total=len(pairs), disable=not progress, unit="pair", desc="subtract") as bar:
        for start in range(0, len(pairs), size):
            chunk = prepared[start : start + size]
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            batch = tuple(stack([p[j] for p in padded]) for j in range(3))
            batch = jax.device_put(batch, sharding)
            with runtime.single_threaded_blas():
                out = jax.device_get(_run_batch(batch, config, plan))
            for (_, science, _), result in zip(pairs[start : start + size], unstack(out, len(chunk)), strict=True):
                results.append(restore_wcs(result, science.wcs))
            bar.update(len(chunk))
    return results


def _difference_path(out_dir: str | None, science_path: str) -> str:
    folder = os.path.dirname(os.path.abspath(science_path)) if out_dir is None else out_dir
    stem = os.path.basename(science_path)
    for ext in (".fits.gz", ".fits", ".fit"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return os.path.join(folder, f"{stem}_diff.fits")


def run_files(
    items: Sequence[tuple[str, str, Sources]],
    config: SubtractConfig | None = None,
    batch_size: int | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Subtract FITS pairs from disk in batches, reading the next batch while the current one runs.

    A background thread reads batch i + 1 with `jd.read_exposure` while the device subtracts batch i, so the
    device does not wait on FITS reads; each difference is written with `jd.write_exposure`. A pair that fails
    (too little template coverage, too few kernel stars, ...) is reported in its row; the others go on.

    Arguments:
        items: (template path, science path, `jd.Sources`) triples of one image shape.
        config: a `SubtractConfig` (None: LSST's defaults).
        batch_size: pairs per batch (default: 4 per device).
        out_dir: folder for the differences, `<science stem>_diff.fits`, made when missing (default: beside each
            science file).
        progress: show a tqdm progress bar (in pairs).

    Returns:
        One dict per pair, in order: `science`, `difference` (path written, None when the pair failed),
        `status` (a `jd.RESULTS` name), `message` and `metadata` (plain Python numbers).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    items = [(os.fspath(t), os.fspath(s), src) for t, s, src in items]
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    size = _PER_DEVICE * jax.device_count() if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    read = lambda chunk: [(read_exposure(t), read_exposure(s), src) for t, s, src in chunk]
    rows = []
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=len(items), disable=not progress, unit="pair") as bar:
        ahead = pool.submit(read, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            pairs = ahead.result()
            ahead = pool.submit(read, chunks[i + 1]) if i + 1 < len(chunks) else None
            for (_, science_path, _), result in zip(chunk, run_many(pairs, config, size, progress=False), strict=True):
                meta = {k: np.asarray(v).tolist() for k, v in result.metadata.items()}
                status = RESULTS(int(meta["status"]))
                path = None
                if status == RESULTS.successful:
                    path = _difference_path(out_dir, science_path)
                    write_exposure(path, result.difference)
                rows.append(
                    dict(
                        science=science_path, difference=path, status=status.name, message=status.message, metadata=meta
                    )
                )
            bar.update(len(chunk))
    return rows


def _subtract_files(items: list, config: SubtractConfig, out_dir: str | None, batch_size: int) -> list[dict]:
    """One Dask task: `run_files` on its share of the pairs."""
    # A worker is an entry point: like the task, it computes in float64 (float64 files stay float64).
    with jax.enable_x64(True):
        return run_files(items, config, batch_size, out_dir, progress=False)


def dask_map(
    paths: Sequence[tuple[str, str, Sources]],
    config: SubtractConfig | None,
    client,
    batch_size: int = 8,
    out_dir: str | None = None,
) -> list[dict]:
    """Subtract FITS pairs on a `dask.distributed` cluster: batches of pairs are mapped to workers.

    Each task reads its pairs with `jd.read_exposure`, runs them with `run_many` (one compiled program per
    worker process and layout), writes each difference with `jd.write_exposure` and returns paths and
    metadata. Dask schedules, balances and retries the tasks.

    Arguments:
        paths: (template FITS path, science FITS path, `jd.Sources`) triples of one layout.
        config: a `SubtractConfig` (None: LSST's defaults).
        client: a `dask.distributed.Client`.
        batch_size: pairs per task (and per `run_many` batch inside it).
        out_dir: folder for the differences, written as `<science stem>_diff.fits` (default: beside each
            science file); science files must have distinct names when they share an output folder.

    Returns:
        One dict per pair, in order, as `run_files` returns them: `science`, `difference` (None for a failed
        pair), `status` (a `jd.RESULTS` name), `message` and `metadata`.
    """
    config = SubtractConfig() if config is None else config
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    items = []
    for t, s, src in paths:
        if not isinstance(src, Sources):
            raise ValueError(f"dask_map needs a jd.Sources for every pair; got {type(src).__name__} for {s}")
        items.append((os.fspath(t), os.fspath(s), src))
    outputs = [_difference_path(out_dir, s) for _, s, _ in items]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two science files map to the same difference path; give them distinct names")
    tasks = [
        client.submit(_subtract_files, items[i : i + batch_size], config, out_dir, batch_size, pure=False)
        for i in range(0, len(items), batch_size)
    ]
    return [row for rows in client.gather(tasks) for row in rows]
