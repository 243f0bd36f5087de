"""Batches: vmap over stacked pairs, device-sized batches with a progress bar, and Dask over FITS files."""

import jax
import numpy as np
import pytest
from utils import assert_allclose

import jaxdiff as jd
from jaxdiff.batch import dask_map, run_many, stack, stack_pairs, subtract_batch

SHAPE = (96, 96)
CONFIG = jd.SubtractConfig(do_decorrelation=False)


def _pairs(n: int, seed0: int = 0):
    return [
        jd.sim.reference_pair(SHAPE, n_stars=15, seed=seed0 + i, flux_range=(3000, 8000), template_border=4)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def serial():
    pairs = _pairs(16)
    results = [jd.subtract(p.template, p.science, p.sources, CONFIG) for p in pairs]
    return pairs, [jax.device_get(r.difference) for r in results], [jax.device_get(r.metadata) for r in results]


def _same_difference(actual, expected, rtol=1e-10):
    assert_allclose(actual.image, expected.image, rtol=rtol, atol=1e-9 * np.abs(expected.image).max())
    assert_allclose(actual.variance, expected.variance, rtol=rtol)
    np.testing.assert_array_equal(actual.mask, expected.mask)


def test_subtract_batch_equals_separate_calls(serial):
    pairs, diffs, metas = serial
    three = pairs[:3]
    out = subtract_batch(
        stack([p.template for p in three]), stack([p.science for p in three]), stack([p.sources for p in three]), CONFIG
    )
    assert out.difference.image.shape == (3, *SHAPE)
    for i in range(3):
        _same_difference(jax.tree.map(lambda x, i=i: x[i], out.difference), diffs[i])
        assert int(out.metadata["status"][i]) == int(metas[i]["status"])
        assert_allclose(out.metadata["kernel_sum"][i], metas[i]["kernel_sum"], rtol=1e-10)


@pytest.mark.parametrize("sequential", [True, False], ids=["loop", "vmap"])
def test_stack_pairs_takes_different_psfs_and_source_counts(sequential, monkeypatch):
    """`stack` alone cannot stack PSF images or source lists of different sizes; `stack_pairs` pads them to one
    plan, and the batch equals single calls, run as a loop (one CPU device) or vmapped (accelerators)."""
    monkeypatch.setattr(jd.batch, "_sequential", lambda: sequential)
    pairs = [
        jd.sim.reference_pair(
            (128, 128),
            n_stars=n,
            seed=60 + i,
            flux_range=(3000, 8000),
            template_sigma=st,
            science_sigma=ss,
            template_border=4,
        )
        for i, (st, ss, n) in enumerate([(1.2, 1.6, 30), (1.4, 1.9, 45)])
    ]
    triples = [(p.template, p.science, p.sources) for p in pairs]
    assert len(pairs[0].sources.x) != len(pairs[1].sources.x)
    batch, plan = stack_pairs(triples, CONFIG)
    assert batch[2].x.shape == (2, plan.capacity)
    out = subtract_batch(*batch, CONFIG, plan)
    for i, (t, s, src) in enumerate(triples):
        single = jd.subtract(t, s, src, CONFIG)
        _same_difference(jax.tree.map(lambda x, i=i: x[i], out.difference), jax.device_get(single.difference), 1e-6)
        assert int(out.metadata["status"][i]) == int(single.metadata["status"]) == 0


def test_run_many_with_progress_equals_serial_loop(serial, capsys):
    pairs, diffs, metas = serial
    # 5 pairs in batches of 3: the last batch is padded, nothing recompiles.
    results = run_many([(p.template, p.science, p.sources) for p in pairs[:5]], CONFIG, batch_size=3, progress=True)
    assert len(results) == 5
    assert "5/5" in capsys.readouterr().err
    for r, d, m in zip(results, diffs, metas, strict=False):
        _same_difference(r.difference, d)
        assert int(r.metadata["status"]) == int(m["status"])
        assert r.difference.wcs is None


def test_run_many_rejects_mixed_shapes():
    a, b = _pairs(1)[0], jd.sim.reference_pair((64, 64), n_stars=15, seed=3, template_border=4)
    with pytest.raises(ValueError, match="pair 1 differs"):
        run_many([(a.template, a.science, a.sources), (b.template, b.science, b.sources)], CONFIG, progress=False)


@pytest.mark.slow  # two worker processes compile the batched core: about 50 s on 2 CPU cores
def test_dask_local_cluster_equals_serial_loop(serial, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    pairs, diffs, metas = serial
    items = []
    for i, p in enumerate(pairs):
        t, s = tmp_path / f"template_{i:02d}.fits", tmp_path / f"science_{i:02d}.fits"
        jd.write_exposure(t, p.template)
        jd.write_exposure(s, p.science)
        items.append((str(t), str(s), p.sources))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        # The workers get the test session's global float64 mode (conftest); see the report on scoped x64.
        client.run(exec, "import jax; jax.config.update('jax_enable_x64', True)")
        rows = dask_map(items, CONFIG, client, batch_size=8, out_dir=str(out_dir))
    assert len(rows) == len(pairs)
    assert any(row["difference"] is not None for row in rows)
    for row, d, m in zip(rows, diffs, metas, strict=True):
        assert row["metadata"]["status"] == int(m["status"]) and row["status"] == jd.RESULTS(int(m["status"])).name
        assert_allclose(row["metadata"]["kernel_sum"], float(m["kernel_sum"]), rtol=1e-10)
        if row["difference"] is not None:  # failed pairs are reported, not written
            _same_difference(jd.read_exposure(row["difference"]), d)


def test_run_files_reads_ahead_and_reports_failed_pairs(tmp_path):
    """Pairs with different PSF widths and source counts from FITS files; a pair whose template is NO_DATA
    almost everywhere comes back with status `no_work` while the others are written and equal single calls."""
    from jaxdiff.batch import run_files

    items, singles = [], []
    for i, (st, ss, n) in enumerate([(1.8, 2.2, 40), (2.1, 2.4, 60), (1.6, 2.1, 50)]):
        p = jd.sim.reference_pair(
            (160, 160), n_stars=n, seed=40 + i, flux_range=(3000, 8000), template_sigma=st, science_sigma=ss
        )
        template = p.template
        if i == 1:
            mask = np.array(template.mask)
            mask[:, 8:] |= 1 << jd.MASK_PLANES["NO_DATA"]
            template = jd.Exposure(template.image, template.variance, mask, template.psf, template.xy0)
        t_path, s_path = tmp_path / f"t{i}.fits", tmp_path / f"s{i}.fits"
        jd.write_exposure(t_path, template)
        jd.write_exposure(s_path, p.science)
        items.append((t_path, s_path, p.sources))
        singles.append(jd.subtract(jd.read_exposure(t_path), jd.read_exposure(s_path), p.sources, CONFIG))
    rows = run_files(items, CONFIG, batch_size=2, out_dir=str(tmp_path / "out"), progress=False)
    assert [r["status"] for r in rows] == ["successful", "no_work", "successful"]
    assert rows[1]["difference"] is None and "required_template_fraction" in rows[1]["message"]
    for row, single in zip(rows, singles, strict=True):
        assert row["metadata"]["status"] == int(single.metadata["status"])
        if row["difference"] is not None:
            _same_difference(jd.read_exposure(row["difference"]), jax.device_get(single.difference), rtol=1e-6)
