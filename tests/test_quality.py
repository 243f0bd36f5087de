"""Quality figures in the task metadata and the opt-in bad-subtraction error."""

import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff._quality import _boxes, _row_nanmedian, limiting_magnitude


@pytest.fixture(scope="module")
def pair():
    return jd.sim.simulate_pair((160, 160), seed=6, n_stars=60, template_sigma=1.6, science_sigma=2.2)


@pytest.fixture(scope="module")
def result(pair):
    return jd.AlardLuptonSubtract().run(pair.template, pair.science, pair.sources)


def test_quality_figures_in_metadata(pair, result):
    md = result.metadata
    for key in ("template_coverage", "science_variance_factor", "template_variance_factor"):
        assert np.isfinite(md[key])
    assert md["science_psf_fwhm"] == pytest.approx(2.3548 * 2.2, rel=0.02)
    assert md["template_psf_fwhm"] == pytest.approx(2.3548 * 1.6, rel=0.02)
    # 5σ limiting magnitudes (photo_calib 1 nJy/count): science sky 300 + read noise 25 counts², σ 2.2 px
    want = 31.4 - 2.5 * np.log10(5 * np.sqrt(4 * np.pi * 2.2**2 * 325.0))
    assert md["science_limiting_magnitude"] == pytest.approx(want, abs=0.05)
    assert md["template_limiting_magnitude"] > md["science_limiting_magnitude"]  # darker sky, sharper PSF
    assert md["difference_limiting_magnitude"] < md["science_limiting_magnitude"]  # the template adds noise
    # a good subtraction keeps little of the stars: ip_diffim's threshold is 0.2
    assert md["n_footprints"] >= 20
    assert 0 < md["difference_footprint_ratio_mean"] < 0.2
    assert md["difference_footprint_ratio_stdev"] < 0.4
    stamps = md["stamp_statistics"]
    n = len(stamps["x"])
    assert n == int(np.sum(np.asarray(pair.sources.valid))) and len(stamps["residual_std"]) == n
    std = np.array([v for v in stamps["residual_std"] if v is not None])
    assert std.size > 0.8 * n and 0.7 < np.median(std) < 1.5


def test_figures_started_beside_the_subtraction_are_the_same(pair, result):
    """The task cuts the science's footprint boxes and the inputs' magnitudes while XLA runs
    (`start_input_figures` with the sources): the figures are the same numbers as computed all at the end."""
    import concurrent.futures

    from jaxdiff._quality import quality_figures, start_input_figures

    widths = {"template": (1.6, 1.6), "science": (2.2, 2.25)}
    k = int(result.metadata["kernel_size"])
    args = (pair.template, pair.science, result.difference, pair.sources, widths, k)
    at_the_end = quality_figures(*args)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        started = start_input_figures(pair.template, pair.science, widths, pool, pair.sources, k)
        assert "science_boxes" in started
        beside = quality_figures(*args, started=started)
    assert beside == at_the_end
    assert at_the_end["n_footprints"] >= 20


def test_limiting_magnitude_needs_a_calibration():
    var, good = np.full((10, 10), 4.0), np.ones((10, 10), bool)
    assert limiting_magnitude(var, good, (2.0, 2.0), 0.0) is None
    assert limiting_magnitude(var, good, None, 1.0) is None
    # ten times the flux per count: 2.5 magnitudes brighter zero point
    assert limiting_magnitude(var, good, (2.0, 2.0), 10.0) == pytest.approx(
        limiting_magnitude(var, good, (2.0, 2.0), 1.0) - 2.5
    )


def test_bad_subtraction_raises_above_threshold(pair, result):
    ratio = result.metadata["difference_footprint_ratio_mean"]
    # opt-in: off by default, so a low threshold alone changes nothing
    jd.AlardLuptonSubtract(bad_subtraction_ratio_threshold=ratio / 2).run(pair.template, pair.science, pair.sources)
    task = jd.AlardLuptonSubtract(raise_on_bad_subtraction_ratio=True, bad_subtraction_ratio_threshold=ratio / 2)
    with pytest.raises(jd.BadSubtractionError) as info:
        task.run(pair.template, pair.science, pair.sources)
    assert info.value.ratio == pytest.approx(ratio) and info.value.threshold == ratio / 2
    # at the default thresholds this subtraction passes
    jd.AlardLuptonSubtract(raise_on_bad_subtraction_ratio=True).run(pair.template, pair.science, pair.sources)


def test_bad_subtraction_detected(pair, result):
    """A template 30 % too bright, subtracted with the kernel of the good fit (which cannot absorb the scale),
    leaves 30 % of the stars in the difference: the ratio exceeds ip_diffim's 0.2 and the task raises."""
    t = pair.template
    bright = jd.Exposure(1.3 * np.asarray(t.image), 1.69 * np.asarray(t.variance), t.mask, t.psf, t.xy0)
    kernel = result.psf_matching_kernel
    md = jd.AlardLuptonSubtract().run_with_kernel(bright, pair.science, kernel, sources=pair.sources).metadata
    assert 0.2 < md["difference_footprint_ratio_mean"] < 0.35
    task = jd.AlardLuptonSubtract(raise_on_bad_subtraction_ratio=True)
    with pytest.raises(jd.BadSubtractionError, match="above the threshold 0.2"):
        task.run_with_kernel(bright, pair.science, kernel, sources=pair.sources)
    # with the flux scale fitted the subtraction is good again
    good = task.run_with_kernel(bright, pair.science, kernel, fit_flux_scale=True, sources=pair.sources)
    assert good.metadata["difference_footprint_ratio_mean"] < 0.2


def test_stamp_statistics_equal_a_direct_loop_also_at_the_edges(pair, result):
    """The per-source residual statistics read only cut-outs around the sources: they equal a direct loop over
    the sources with explicit bounds, for sources whose stamps run off the image too."""
    from jaxdiff._mask import bitmask
    from jaxdiff._quality import _EXCLUDED, footprint_figures

    d = result.difference
    img, var, mask = (np.asarray(a) for a in (d.image, d.variance, d.mask))
    s_img = np.asarray(pair.science.image)
    x0, y0 = (int(v) for v in np.asarray(pair.science.xy0))
    ny, nx = img.shape
    xs = np.array([x0 + 1.2, x0 + nx - 2.0, x0 + 80.4, x0 + 40.0, x0 + 3.0])
    ys = np.array([y0 + 70.0, y0 + 5.0, y0 + ny - 1.0, y0 + 40.0, y0 + 2.0])
    sources = jd.Sources(x=xs, y=ys, valid=np.ones(xs.size, bool))
    half = 14  # wider than the masked border, so stamps that run off the image still hold data
    stats = footprint_figures(pair.science, d, sources, 4.0, half)["stamp_statistics"]
    ok = np.isfinite(img) & np.isfinite(var) & (var > 0) & np.isfinite(s_img)
    ok &= (mask & bitmask(d.mask_planes, _EXCLUDED)) == 0
    n_with_data = 0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        cx, cy = int(np.floor(x + 0.5)) - x0, int(np.floor(y + 0.5)) - y0
        rows = slice(max(cy - half, 0), min(cy + half + 1, ny))
        cols = slice(max(cx - half, 0), min(cx + half + 1, nx))
        z = (img[rows, cols] / np.sqrt(np.where(ok[rows, cols], var[rows, cols], 1.0)))[ok[rows, cols]]
        assert stats["n_pixels"][i] == z.size
        if z.size == 0:  # e.g. a stamp inside the EDGE-masked border
            assert stats["residual_mean"][i] is None and stats["residual_std"][i] is None
            continue
        n_with_data += 1
        assert stats["residual_mean"][i] == pytest.approx(z.mean(), rel=1e-5, abs=1e-6)
        assert stats["residual_std"][i] == pytest.approx(z.std(ddof=1), rel=1e-5)
    assert n_with_data >= 3


@pytest.mark.parametrize("shape, r", [((64, 80), 5), ((9, 40), 6), ((5, 5), 4)])
def test_boxes_equal_a_pixel_gather_with_fill(shape, r):
    """Windows inside the array, boxes crossing its edges and arrays smaller than a box all give the cut-outs of a
    pixel-by-pixel gather that fills beyond the array."""
    rng = np.random.default_rng(3)
    ny, nx = shape
    planes = [rng.normal(size=shape).astype(np.float32), rng.integers(1, 9, shape).astype(np.int32)]
    cx, cy = rng.integers(-8, nx + 8, 40), rng.integers(-8, ny + 8, 40)
    off = np.arange(-r, r + 1)
    for p, fill, box in zip(planes, (np.nan, 0), _boxes(planes, cx, cy, r, (np.nan, 0)), strict=True):
        assert box.shape == (40, 2 * r + 1, 2 * r + 1)
        for i in range(40):
            for a, row in enumerate(cy[i] + off):
                for b, col in enumerate(cx[i] + off):
                    want = p[row, col] if 0 <= row < ny and 0 <= col < nx else fill
                    assert box[i, a, b] == want or (np.isnan(want) and np.isnan(box[i, a, b]))


def test_row_nanmedian_is_numpys():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 31))
    x[rng.random(x.shape) < 0.2] = np.nan
    x[3] = np.nan  # a row without a value
    x[7, :2] = np.inf
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want = np.nanmedian(x, axis=1)
    np.testing.assert_array_equal(_row_nanmedian(x), want)
