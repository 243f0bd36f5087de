"""The store of exported programs: a fresh process runs a program it has run before without tracing it again."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import _programs, _subtract
from jaxdiff._subtract import _jit_core, core, core_inputs


@pytest.fixture
def store(tmp_path):
    """The store in a fresh directory, restored afterwards to what the worker had (an entry point may have set it)."""
    previous = _programs.directory()
    _programs.enable(tmp_path / "programs")
    yield tmp_path / "programs"
    _programs.enable(previous)


def _files(directory):
    return sorted(directory.glob(f"*{_programs.SUFFIX}"))


def test_a_stored_program_gives_the_traced_result_and_is_read_back_without_tracing(store, monkeypatch):
    pair = jd.sim.simulate_pair((128, 128), seed=4, n_stars=40)
    config = jd.SubtractConfig(do_subtract_background=True)
    plan = jd.make_plan(pair.template, pair.science, pair.sources, config)
    inputs = core_inputs(pair.template, pair.science, pair.sources, psf_size=plan.psf_size, capacity=plan.capacity)
    traced = _jit_core(*inputs, config, plan)

    stored = jd.subtract(pair.template, pair.science, pair.sources, config)
    assert len(_files(store)) == 1
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(stored.difference, name), getattr(traced.difference, name))
    assert stored.metadata.keys() == traced.metadata.keys()
    for key, value in traced.metadata.items():
        np.testing.assert_array_equal(stored.metadata[key], value, err_msg=key)
    assert stored.difference.mask_planes == traced.difference.mask_planes

    # as a new process finds it: nothing in memory, and exporting (tracing) would fail
    _programs.enable(store)

    def no_export(*args):
        raise AssertionError("traced although the program is stored")

    monkeypatch.setattr(_programs, "_export", no_export)
    again = jd.subtract(pair.template, pair.science, pair.sources, config)
    np.testing.assert_array_equal(again.difference.image, traced.difference.image)

    # a damaged file is ignored (and rewritten once exporting is possible again)
    _files(store)[0].write_bytes(b"not a program")
    _programs.enable(store)
    assert _programs.call("core", core, inputs, config, plan) is None  # the export fails → the traced path
    monkeypatch.undo()
    _programs.enable(store)
    rewritten = _programs.call("core", core, inputs, config, plan)
    np.testing.assert_array_equal(rewritten.difference.image, traced.difference.image)
    assert _files(store)[0].read_bytes() != b"not a program"


def test_large_images_compile_with_the_memory_optimised_schedule_and_the_same_results(store, monkeypatch):
    assert _subtract.xla_options((4096, 4096)) == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert _subtract.xla_options((2048, 2048)) == {}
    assert _subtract.xla_options((3, 4096, 4096)) == _subtract.xla_options((4096, 4096))  # a stacked batch
    pair = jd.sim.simulate_pair((128, 128), seed=5, n_stars=40)
    config = jd.SubtractConfig(do_subtract_background=True)
    plan = jd.make_plan(pair.template, pair.science, pair.sources, config)
    inputs = core_inputs(pair.template, pair.science, pair.sources, psf_size=plan.psf_size, capacity=plan.capacity)
    default = _jit_core(*inputs, config, plan)

    # this pair counts as large (an option this jaxlib does not know would raise when compiling)
    monkeypatch.setattr(_subtract, "LOW_MEMORY_PIXELS", 128 * 128)
    taken, low_memory = [], _subtract._jit_core_low_memory
    monkeypatch.setattr(_subtract, "_jit_core_low_memory", lambda *args: taken.append(1) or low_memory(*args))
    _programs.enable(None)
    jitted = jd.subtract(pair.template, pair.science, pair.sources, config)
    assert taken
    _programs.enable(store)
    stored = jd.subtract(pair.template, pair.science, pair.sources, config)
    for result in (jitted, stored):
        for name in ("image", "variance", "mask"):
            np.testing.assert_array_equal(getattr(result.difference, name), getattr(default.difference, name))


def test_the_store_stays_out_of_transformations_and_disable_jit(store):
    pair = jd.sim.simulate_pair((64, 64), seed=1, n_stars=10)
    config = jd.SubtractConfig()
    plan = jd.make_plan(pair.template, pair.science, pair.sources, config)
    inputs = core_inputs(pair.template, pair.science, pair.sources, psf_size=plan.psf_size, capacity=plan.capacity)
    seen = []

    @jax.jit
    def under_jit(image):
        traced_inputs = (eqx.tree_at(lambda e: e.image, inputs[0], image), *inputs[1:])
        seen.append(_programs.call("core", core, traced_inputs, config, plan))
        return image.sum()

    under_jit(inputs[0].image)
    assert seen == [None]
    with jax.disable_jit():
        assert _programs.call("core", core, inputs, config, plan) is None
    _programs.enable(None)
    assert _programs.call("core", core, inputs, config, plan) is None
    assert not store.exists() or not _files(store)


def test_a_static_value_without_a_stable_repr_gets_no_key():
    class Opaque:
        pass

    assert _programs._key("core", (np.zeros(3),), (Opaque(),)) is None
    assert _programs._key("core", (np.zeros(3),), (jd.SubtractConfig(),)) is not None
    # the key follows shapes, dtypes and static values
    keys = {
        _programs._key("core", (np.zeros(3),), (jd.SubtractConfig(),)),
        _programs._key("core", (np.zeros(4),), (jd.SubtractConfig(),)),
        _programs._key("core", (np.zeros(3, np.float32),), (jd.SubtractConfig(),)),
        _programs._key("core", (np.zeros(3),), (jd.SubtractConfig(do_decorrelation=False),)),
        _programs._key("other", (np.zeros(3),), (jd.SubtractConfig(),)),
    }
    with jax.default_matmul_precision("highest"):  # a JAX setting that changes the traced program
        keys.add(_programs._key("core", (np.zeros(3),), (jd.SubtractConfig(),)))
    assert len(keys) == 6


def test_prune_keeps_the_most_recently_used(store, monkeypatch):
    monkeypatch.setattr(_programs, "MAX_FILES", 3)
    store.mkdir(parents=True)
    for i in range(5):
        path = store / f"{i}{_programs.SUFFIX}"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (store / "other-cache").write_bytes(b"XLA's")
    _programs._prune()
    assert [p.name for p in _files(store)] == [f"{i}{_programs.SUFFIX}" for i in (2, 3, 4)]
    assert (store / "other-cache").exists()


_COUNT_TRACES = """
import jaxdiff as jd
from jaxdiff import _subtract, batch
traces = []
original = _subtract.core
def counted(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)
_subtract.core = batch.core = counted
"""


def _with_trace_count(script: str) -> str:
    """A child-process script in which `traces` counts the traces of the core (single and batched calls)."""
    return textwrap.dedent(script).replace("{count_traces}\n", _COUNT_TRACES.lstrip())


def test_a_second_process_runs_the_stored_programs_without_tracing(tmp_path):
    """Two processes run the task on one pair and `run_many` on two; the first also calls `precompile`, the second
    also runs a pair whose PSFs call for the other kernel side. The second process never traces the core (the store
    serves the single, the precompiled and the batched programs) and gets the first one's results bit for bit.
    (Two kernel buckets keep the test short.)"""
    script = _with_trace_count(
        """
        import hashlib
        import sys
        import numpy as np
        from jaxdiff import batch
        {count_traces}
        task = jd.AlardLuptonSubtract(kernel_size_buckets=(21, 35))
        pair = jd.sim.simulate_pair((128, 128), seed=7, n_stars=40, template_sigma=1.5, science_sigma=2.0)
        result = task.run(pair.template, pair.science, pair.sources)
        other = jd.sim.simulate_pair((128, 128), seed=8, n_stars=50)
        many = batch.run_many([(p.template, p.science, p.sources) for p in (pair, other)], progress=False)
        if sys.argv[1] == "first":
            print(sorted(task.precompile(pair.template, pair.science, pair.sources)))
        else:
            wide = jd.sim.simulate_pair((128, 128), seed=9, n_stars=40, template_sigma=2.6, science_sigma=3.9)
            print(task.run(wide.template, wide.science, wide.sources).metadata["kernel_size"])
        digest = hashlib.sha256()
        for image in (result.difference.image, many[0].difference.image, many[1].difference.image):
            digest.update(np.ascontiguousarray(image).tobytes())
        print(len(traces), digest.hexdigest())
        """
    )
    env = {**os.environ, "JAXDIFF_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for step in ("first", "second"):
        out = subprocess.run([sys.executable, "-c", script, step], env=env, capture_output=True, text=True, check=True)
        *_, extra, last = out.stdout.strip().splitlines()
        traces, digest = last.split()
        runs.append((extra, int(traces), digest))
    assert runs[0][0] == "[21, 35]" and runs[0][1] >= 1, runs[0]
    assert runs[1][0] == "35" and runs[1][1] == 0, runs[1]
    assert runs[0][2] == runs[1][2]
    assert len(_files(tmp_path / "cache")) == 3  # the task's two kernel sides and the batched program
