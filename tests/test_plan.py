"""The static plan (ALGORITHM §2): only shapes are static, so new pairs reuse compiled programs."""

import dataclasses
import subprocess
import sys
import textwrap
from collections import Counter

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from numpy.testing import assert_allclose

import jaxdiff as jd
from jaxdiff._plan import bucket, kernel_size_for, nearest_bucket, with_slots_for
from jaxdiff.stamps import CHUNK, over_slots

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_kernel_size_moves_to_the_nearest_bucket():
    cfg = jd.SubtractConfig(kernel_size_buckets=(21, 27, 35))
    # σ 2.0 → 2.4: ip_diffim's rule gives 21 (the minimum)
    assert kernel_size_for(cfg, (2.0, 2.0), (2.4, 2.4), "convolveTemplate") == 21
    # σ 2.0 → 2.9: the rule gives 25, the nearest bucket is 27
    assert kernel_size_for(cfg, (2.0, 2.0), (2.9, 2.9), "convolveTemplate") == 27
    # score image, σ 2.4 → 2.4·√2: the rule gives 29 (ALGORITHM's table), the nearest bucket is 27
    pre = dataclasses.replace(cfg, use_preconvolution=True)
    assert kernel_size_for(pre, (2.4, 2.4), (2.4, 2.4), "convolveTemplate") == 27
    # σ 1.5 → 3.8: the rule clamps at kernel_size_max
    assert kernel_size_for(cfg, (1.5, 1.5), (3.8, 3.8), "convolveTemplate") == 35
    assert bucket(22, (21, 35)) == 35 and bucket(40, (21, 35)) == 35 and bucket(7, ()) == 7
    assert nearest_bucket(23, (21, 27, 35)) == 21 and nearest_bucket(31, (21, 27, 35)) == 35
    assert nearest_bucket(24, (21, 27)) == 27 and nearest_bucket(41, (21, 35)) == 35 and nearest_bucket(7, ()) == 7


def test_plan_is_the_same_for_different_widths_and_source_counts():
    """New PSF widths within a kernel-size bucket and new source counts: one plan (the fit skips the chunks of
    stamp slots without a star instead of the slots following the star count); a plan for a batch, whose
    skipped chunks would run under vmap, takes only the slots its pairs need."""
    plans = []
    for i, (st, ss, n) in enumerate([(2.0, 2.3, 50), (1.9, 2.1, 120), (2.2, 2.6, 300), (2.4, 2.5, 999)]):
        pair = jd.sim.simulate_pair((128, 128), seed=i, n_stars=n, template_sigma=st, science_sigma=ss)
        plans.append(jd.make_plan(pair.template, pair.science, pair.sources, jd.SubtractConfig()))
    assert len(set(plans)) == 1
    assert plans[0].n_slots == 1024 and plans[0].capacity == 1024 and plans[0].k == 21 and plans[0].psf_size == 41
    assert [with_slots_for(plans[0], n).n_slots for n in (50, 120, 300, 999)] == [128, 128, 512, 1024]
    assert (
        jd.make_plan(pair.template, pair.science, pair.sources, jd.SubtractConfig(max_kernel_sources=100)).n_slots
        == 128
    )


def _eqns(jaxpr, name: str) -> list:
    """The equations named `name` in a jaxpr and in every jaxpr nested in its equations' parameters."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _eqns(inner, name)
    return found


def test_over_slots_skips_chunks_without_a_star_and_equals_vmap(rng):
    x = jnp.asarray(rng.normal(size=(512, 3)))
    valid = jnp.zeros(512, bool).at[5].set(True).at[300].set(True)  # two chunks hold a star
    calls = []

    def fn(a):
        calls.append(a.shape)
        return {"sum": a.sum(axis=1), "sq": a**2}

    out = jax.jit(lambda a, v: over_slots(fn, v, a, fill=jnp.nan))(x, valid)
    chunk = np.arange(512) // CHUNK
    used = np.isin(chunk, (5 // CHUNK, 300 // CHUNK))
    assert 512 // CHUNK > 2 and 5 // CHUNK != 300 // CHUNK
    assert_allclose(np.asarray(out["sum"])[used], np.asarray(x.sum(axis=1))[used])
    assert np.all(np.isnan(np.asarray(out["sum"])[~used])) and np.all(np.isnan(np.asarray(out["sq"])[~used]))
    assert calls == [(CHUNK, 3), (CHUNK, 3)]  # traced once for the shapes, once for the branch
    # under vmap (a batch) the chunks of each pair are decided per pair, as separate calls would
    both = jax.vmap(lambda a, v: over_slots(fn, v, a, fill=0.0))(jnp.stack([x, x]), jnp.stack([valid, ~valid]))
    assert_allclose(np.asarray(both["sum"][0])[used], np.asarray(x.sum(axis=1))[used])
    assert_allclose(np.asarray(both["sum"][1]), np.asarray(x.sum(axis=1)))
    # a batch with a named axis: a pair's own empty chunks still get the fill (as a single call gives them), and
    # a chunk no pair needs is a real branch, not a select (the predicate is shared, so the cond is not batched)
    few = jnp.zeros(512, bool).at[5].set(True)  # one chunk only; the batch together needs two
    named = lambda a, v: over_slots(fn, v, a, fill=jnp.nan, axis_name="pairs")
    pairs = (jnp.stack([x, x]), jnp.stack([valid, few]))
    batched = jax.vmap(named, axis_name="pairs")(*pairs)
    for i, v in enumerate((valid, few)):
        single = jax.jit(lambda a, v: over_slots(fn, v, a, fill=jnp.nan))(x, v)
        np.testing.assert_array_equal(np.asarray(batched["sum"][i]), np.asarray(single["sum"]))
    conds = _eqns(jax.make_jaxpr(jax.vmap(named, axis_name="pairs"))(*pairs).jaxpr, "cond")
    assert conds and all(c.invars[0].aval.shape == () for c in conds)
    plain = _eqns(jax.make_jaxpr(jax.vmap(lambda a, v: over_slots(fn, v, a, fill=0.0)))(*pairs).jaxpr, "cond")
    assert not plain  # the unnamed vmap turns its cond into a select over both branches
    # gradients flow through the computed chunks only
    g = jax.grad(lambda a: jnp.nansum(over_slots(fn, valid, a, fill=jnp.nan)["sum"]))(x)
    assert_allclose(np.asarray(g), np.where(used[:, None], 1.0, 0.0) * np.ones((1, 3)))


def test_auto_mode_is_decided_inside_the_program():
    pair = jd.sim.simulate_pair((128, 128), seed=1, n_stars=40)
    assert jd.make_plan(pair.template, pair.science, pair.sources, jd.SubtractConfig(mode="auto")).mode == "auto"


def test_traced_psf_without_plan_raises_a_clear_error():
    pair = jd.sim.simulate_pair((96, 96), seed=1, n_stars=30, psf_size=21)

    def loss(width):
        science = eqx.tree_at(lambda e: e.psf, pair.science, jd.GaussianPsf(width, 21))
        return jd.subtract(pair.template, science, pair.sources).difference.image.sum()

    with pytest.raises(jd.PlanError, match="jd.make_plan"):
        jax.jit(loss)(2.4)


class _Compiles:
    """Programs obtained from XLA, by function name: `compiled` (a real compilation) and `loaded` (read from the
    persistent cache). JAX times both with the backend-compile event; a cache read first emits a cache-hit event."""

    def __init__(self):
        self.compiled, self.loaded = Counter(), Counter()
        self._hit = False
        monitoring.register_event_duration_secs_listener(self.on_duration)
        monitoring.register_event_listener(self.on_event)

    @property
    def n(self) -> int:
        return sum(self.compiled.values())

    def programs(self) -> Counter:
        return self.compiled + self.loaded

    def on_duration(self, event, duration, fun_name="?", **kwargs):
        if event == _COMPILE_EVENT:
            (self.loaded if self._hit else self.compiled)[fun_name] += 1
            self._hit = False

    def on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self._hit = True


@pytest.mark.slow
def test_a_stream_of_new_pairs_compiles_once_per_image_size():
    """Pairs of one size with new PSF widths (one kernel-size bucket), new source counts and `sources=None`: one
    core program serves given and detected lists, one detection program; the last two pairs need nothing new."""
    task = jd.AlardLuptonSubtract(kernel_size_buckets=(21,))
    specs = [(2.0, 2.4, 60, True), (1.8, 2.5, 90, False), (2.3, 2.0, 110, True), (1.6, 2.9, 45, False)]
    pairs = [
        jd.sim.simulate_pair((160, 160), seed=10 + i, n_stars=n, template_sigma=st, science_sigma=ss)
        for i, (st, ss, n, _) in enumerate(specs)
    ]
    counter = _Compiles()
    counts = []
    for pair, (*_, given) in zip(pairs, specs, strict=True):
        before = sum(counter.programs().values())
        result = task.run(pair.template, pair.science, pair.sources if given else None)
        assert result.metadata["kernel_size"] == 21
        counts.append(sum(counter.programs().values()) - before)
    programs = counter.programs()
    assert sum(counts[2:]) == 0, (counts, programs)
    # the task runs the core through the store of exported programs (`jaxdiff._programs`), named "core"
    assert programs["jit(core)"] == 1 and programs["jit(_detection_maps)"] == 1, programs
    # and nothing else: PSF widths for the plan and the quality figures are measured on the host
    assert set(programs) == {"jit(core)", "jit(_detection_maps)"}, programs


@pytest.mark.slow
def test_a_second_process_reads_the_persistent_cache(tmp_path):
    script = textwrap.dedent(
        """
        import jax
        from jax import monitoring
        import jaxdiff as jd
        counts = {"compiles": 0, "hits": 0}
        def on_duration(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                counts["compiles"] += 1
        def on_event(event, **kw):
            if event == "/jax/compilation_cache/cache_hits":
                counts["hits"] += 1
        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)
        pair = jd.sim.simulate_pair((160, 160), seed=2, n_stars=60)
        before = dict(counts)
        jd.AlardLuptonSubtract(kernel_size_buckets=(21,)).run(pair.template, pair.science, pair.sources)
        hits = counts["hits"] - before["hits"]
        print(counts["compiles"] - before["compiles"] - hits, hits)  # the compile event also times cache reads
        """
    )
    env = {**__import__("os").environ, "JAXDIFF_CACHE_DIR": str(tmp_path / "xla")}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        runs.append([int(v) for v in out.stdout.split()[-2:]])
    (first_compiles, first_hits), (second_compiles, second_hits) = runs
    assert first_compiles >= 1 and first_hits == 0
    assert second_hits >= 1 and second_compiles == 0  # PSF widths are measured on the host: no other program
    assert any(p.suffix != ".lockfile" for p in (tmp_path / "xla").iterdir())


def test_runtime_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from jaxdiff import _runtime

    monkeypatch.setenv("JAXDIFF_CACHE_DIR", "off")
    assert _runtime.cache_dir() is None
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(tmp_path / "c"))
    assert _runtime.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JAXDIFF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _runtime.cache_dir() == tmp_path / "jaxdiff" / "xla"


def test_blas_limit_holds_inside_the_block_and_is_restored_after():
    """The task's one-BLAS-thread block (a controller found once per process) sets and restores the limit,
    also when nested."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from jaxdiff import _runtime

    if jax.default_backend() != "cpu":
        pytest.skip("the limit is applied on the CPU backend only")

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    if not before or max(before) < 2:
        pytest.skip("no multi-threaded BLAS loaded: nothing to limit")
    with _runtime.single_threaded_blas():
        assert blas_threads() == [1] * len(before)
        with _runtime.single_threaded_blas():
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before


def test_blas_libraries_are_found_again_after_an_import(monkeypatch):
    """A BLAS loaded after the first task call (by an import, e.g. scipy's) is limited too: the kept controller
    is replaced when the set of imported modules grew, and kept otherwise."""
    pytest.importorskip("threadpoolctl")
    import sys
    import types

    from jaxdiff import _runtime

    first = _runtime._blas_controller()
    assert _runtime._blas_controller() is first
    monkeypatch.setitem(sys.modules, "jaxdiff_test_new_module", types.ModuleType("jaxdiff_test_new_module"))
    again = _runtime._blas_controller()
    assert again is not first
    assert _runtime._blas_controller() is again


def test_helper_threads_are_kept_and_made_again_in_a_forked_child(monkeypatch):
    """The task's host work beside XLA runs on one pool per process: the same threads on every call (a pool per
    call let its threads exit just after the program and stalled the task), a new pool in a forked child."""
    import os
    import threading

    from jaxdiff import _runtime

    pool = _runtime.helper_pool()
    assert pool.submit(lambda: 7).result() == 7
    assert _runtime.helper_pool() is pool
    # the threads that ran 20 calls' work: a pool per call would start a new thread for each
    workers = {_runtime.helper_pool().submit(threading.current_thread).result() for _ in range(20)}
    assert 1 <= len(workers) <= 2 and all(t.is_alive() for t in workers)
    assert threading.current_thread() not in workers
    monkeypatch.setattr(_runtime, "_pool", _runtime._pool)  # this process's pool comes back after the test
    monkeypatch.setattr(os, "getpid", lambda: -1)
    child = _runtime.helper_pool()
    assert child is not pool
    child.shutdown()


@pytest.mark.parametrize("nodata", [0.1, 0.0])
@pytest.mark.parametrize(
    ("dx", "dy", "shape"),
    [(0, 0, (90, 80)), (3, 4, (100, 95)), (7, -5, (90, 80)), (-30, 40, (60, 100)), (200, 0, (90, 80))],
)
def test_host_coverage_equals_the_traced_one(dx, dy, shape, nodata):
    """The task's pre-check (numpy, the template's overlap as a slice) and the core's traced coverage agree for
    offset, partial and missing overlaps and a template box containing the science box (the traced version's
    slice branch), with NO_DATA pixels in both images and without any."""
    from jaxdiff._plan import coverage

    rng = np.random.default_rng(abs(dx) + 100 * abs(dy))
    pair = jd.sim.simulate_pair((90, 80), seed=2, n_stars=5)
    t, s = pair.template, pair.science
    nd_t, nd_s = (1 << dict(e.mask_planes)["NO_DATA"] for e in (t, s))
    t_mask = np.where(rng.uniform(size=shape) < nodata, nd_t, 0).astype(np.asarray(t.mask).dtype)
    s_mask = np.asarray(s.mask) | np.where(rng.uniform(size=s.shape) < nodata / 2, nd_s, 0).astype(t_mask.dtype)
    x0, y0 = (int(v) for v in np.asarray(s.xy0))
    t = dataclasses.replace(
        t, image=np.zeros(shape, np.float32), variance=np.ones(shape, np.float32), mask=t_mask, xy0=(x0 - dx, y0 - dy)
    )
    s = dataclasses.replace(s, mask=s_mask)
    host, traced = coverage(t, s, np), coverage(t, s)
    assert float(host) == pytest.approx(float(traced), abs=1e-6)  # float32 division and XLA's mean round apart
    # the definition, pixel by pixel
    rows, cols = np.arange(90)[:, None] + dy, np.arange(80)[None, :] + dx
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    t_has = np.zeros((90, 80), bool)
    t_has[inside] = (
        t_mask[np.broadcast_to(rows, inside.shape)[inside], np.broadcast_to(cols, inside.shape)[inside]] & nd_t
    ) == 0
    expected = np.mean(t_has & ((s_mask & nd_s) == 0))
    assert float(host) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "case", ["clean", "nan", "negative", "inf", "-inf", "negative zero", "nan image", "none usable", "last row"]
)
def test_data_facts_equal_the_pixelwise_definition(case):
    """The task's host checks (fast paths for valid data) count what the pixel-wise definitions count."""
    from jaxdiff._plan import data_facts

    rng = np.random.default_rng(3)
    image = rng.normal(size=(150, 40)).astype(np.float32)
    variance = rng.uniform(0.5, 2.0, size=image.shape).astype(np.float32)
    bad = rng.uniform(size=image.shape) < 0.01
    if case in ("nan", "negative", "inf", "-inf", "negative zero"):
        variance[bad] = {"nan": np.nan, "negative": -1.0, "inf": np.inf, "-inf": -np.inf, "negative zero": -0.0}[case]
    elif case == "nan image":
        image[bad], variance[bad] = np.nan, np.nan
    elif case == "none usable":
        variance[:] = 0.0
    elif case == "last row":
        variance[:-1] = 0.0
        variance[-1, 5] = 1.0
    e = jd.Exposure(image, variance, np.zeros(image.shape, np.int32))
    found = data_facts(e, e)
    usable = bool(np.any(np.isfinite(image) & np.isfinite(variance) & (variance > 0)))
    invalid = int(np.count_nonzero(np.isfinite(image) & ~(np.isfinite(variance) & (variance >= 0))))
    for name in ("template", "science"):
        assert found[f"{name}_usable"] is usable
        assert found[f"{name}_bad_variance"] == invalid
    assert usable == (case != "none usable")
    assert (invalid > 0) == (case in ("nan", "negative", "inf", "-inf"))


@pytest.mark.parametrize("dtype", ["<f2", "<f4", ">f4", "<f8", ">f8", "<i4"])
def test_one_pass_variance_check_never_passes_an_invalid_plane(dtype):
    """`_all_valid_variance` (one maximum over the bits) says True exactly for planes that are finite and ≥ 0,
    except −0.0, a valid value it leaves to the exact count; FITS planes arrive big-endian."""
    from jaxdiff._plan import _all_valid_variance

    values = [0.0, 1.0, 7.5, -0.0, -1.0, np.nan, np.inf, -np.inf]
    if dtype[1] == "f":
        values += [float(np.finfo(dtype).max), float(np.finfo(dtype).tiny) / 2]
    else:
        values = [v for v in values if np.isfinite(v)]
    for v in values:
        plane = np.full((6, 5), 2.0).astype(dtype)
        with np.errstate(invalid="ignore"):
            plane[3, 2] = v
        valid = bool(np.all(np.isfinite(plane) & (plane >= 0)))
        fast = _all_valid_variance(plane)
        assert fast == (valid and not np.signbit(plane[3, 2])), (dtype, v)
        assert _all_valid_variance(plane[:, ::2]) == _all_valid_variance(np.ascontiguousarray(plane[:, ::2]))
    assert not _all_valid_variance(np.zeros((0, 3), dtype))


def test_entry_points_drop_compiled_programs_near_the_map_limit(monkeypatch):
    """A compilation that leaves the process above half its memory-map limit makes the next entry point call
    clear JAX's caches (LLVM aborts the process at the limit); below it nothing is dropped."""
    from jaxdiff import _runtime

    if _runtime.map_count() is None:
        pytest.skip("no /proc/self/maps on this system")
    _runtime.enter()
    monkeypatch.setattr(_runtime, "_near_map_limit", False)
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return x * 2.0

    monkeypatch.setattr(_runtime, "map_limit", lambda: 4 * _runtime.map_count() + 1000)
    f(1.0)
    _runtime.enter()
    f(1.0)
    assert len(traces) == 1
    monkeypatch.setattr(_runtime, "map_limit", lambda: 10)  # as if the process were at its limit
    jax.jit(lambda x: x - 1.0)(3.0)  # a compilation: the listener notes the map count
    f(1.0)
    assert len(traces) == 1  # nothing is dropped in the middle of a computation
    _runtime.enter()
    f(1.0)
    assert len(traces) == 2  # the program was dropped and compiled again
