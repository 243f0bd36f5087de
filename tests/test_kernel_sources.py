"""Kernel-source fallback: too few usable catalogue sources → detect on the science image and retry."""

import numpy as np
import pytest

import jaxdiff as jd


@pytest.fixture(scope="module")
def pair():
    return jd.sim.simulate_pair((192, 192), seed=8, n_stars=80, template_sigma=1.6, science_sigma=2.2)


def _two_bright(pair):
    """The catalogue cut to its two brightest stars well inside the image (both usable)."""
    x, y, f = (np.asarray(a) for a in (pair.sources.x, pair.sources.y, pair.sources.flux))
    inner = (x > 50) & (x < 140) & (y > 50) & (y < 140) & (f < 5e4)
    i = np.argsort(np.where(inner, -f, np.inf))[:2]
    return jd.Sources(x[i], y[i], f[i])


def test_two_usable_stars_are_rescued_by_detection(pair):
    two = _two_bright(pair)
    with pytest.raises(jd.InsufficientKernelSourcesError) as info:
        jd.AlardLuptonSubtract().run(pair.template, pair.science, two)
    assert info.value.n_sources == 2
    rescued = jd.AlardLuptonSubtract(allow_kernel_source_detection=True).run(pair.template, pair.science, two)
    md = rescued.metadata
    assert md["kernel_sources"] == "detected" and "only 2 usable" in md["kernel_sources_error"]
    assert md["n_stamps_used"] >= 3
    full = jd.AlardLuptonSubtract().run(pair.template, pair.science, pair.sources)
    assert full.metadata["kernel_sources"] == "given"
    assert md["kernel_sum"] == pytest.approx(full.metadata["kernel_sum"], rel=0.01)
    assert md["difference_footprint_ratio_mean"] < 0.2
    # as clean as the full catalogue's: the same pixel scatter to 5 %
    scatter = [np.nanstd(np.asarray(r.difference.image)) for r in (rescued, full)]
    assert scatter[0] == pytest.approx(scatter[1], rel=0.05)


def test_science_psf_replaced_per_call(pair):
    """A replacement science PSF changes what the task uses (widths, basis, decorrelated PSF), and equals
    running on an exposure that carries that PSF."""
    wider = jd.GaussianPsf(2.6, 21)
    task = jd.AlardLuptonSubtract()
    swapped = task.run(pair.template, pair.science, pair.sources, science_psf=wider)
    s = pair.science
    carried = task.run(pair.template, jd.Exposure(s.image, s.variance, s.mask, wider, s.xy0), pair.sources)
    assert swapped.metadata["science_psf_fwhm"] == pytest.approx(2.3548 * 2.6, rel=1e-3)
    np.testing.assert_array_equal(np.asarray(swapped.difference.image), np.asarray(carried.difference.image))
    assert pair.science.psf is s.psf  # the caller's exposure is unchanged
