"""The diagnostic figure: panels, kernel grid, residual histogram, transient markers, atomic PNG."""

import os
import types

import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import jaxdiff as jd
from jaxdiff import spatial
from jaxdiff._kernel import SpatialKernel
from jaxdiff._psf import gaussian_image
from jaxdiff.plot import diagnostic_figure
from jaxdiff.sim import simulate_pair


@pytest.fixture(scope="module")
def case():
    """A small simulated pair and a stand-in result: a spatially varying kernel and a unit-noise difference."""
    pair = simulate_pair((96, 128), seed=4, n_stars=20, n_transients=3, template_border=4, xy0=(100, 200))
    science = pair.science
    rng = np.random.default_rng(0)
    variance = np.full(science.shape, 4.0)
    difference = jd.Exposure(2.0 * rng.standard_normal(science.shape), variance, psf=science.psf, xy0=(100, 200))
    # order-1 kernel: a Gaussian whose amplitude grows along x, so each grid position has its own sum
    basis = np.stack([np.asarray(gaussian_image(1.2, 1.2, 11)), np.asarray(gaussian_image(2.0, 2.0, 11))])
    coefficients = np.zeros((2, spatial.n_terms(1)))
    coefficients[0, 0] = 1.1
    coefficients[1, 1] = 0.3
    kernel = SpatialKernel(basis, coefficients, np.array([100.0, 200.0, 128.0, 96.0]), 1)
    metadata = {"mode": "convolveTemplate", "n_stamps": 12, "kernel_sum": 1.1, "timing.total": 0.5}
    result = types.SimpleNamespace(difference=difference, psf_matching_kernel=kernel, metadata=metadata)
    return pair, result


def _titled(fig, text):
    return [ax for ax in fig.axes if text in ax.get_title()]


def test_figure_has_image_kernel_histogram_and_metadata_panels(case):
    pair, result = case
    fig = diagnostic_figure(pair.science, pair.template, result)
    for title in ("science", "template", "difference", "matching kernel", "difference / √variance", "run"):
        assert _titled(fig, title), title
    kernel_axes = [ax for ax in fig.axes if ax.get_images() and not ax.get_xticks().size]
    assert len(kernel_axes) == 9
    # three images, three colour bars, nine kernels, the histogram and the metadata text
    assert len(fig.axes) == 17
    run_text = "\n".join(t.get_text() for t in _titled(fig, "run")[0].texts)
    assert "mode: convolveTemplate" in run_text and "n_stamps: 12" in run_text


def test_a_long_run_metadata_stays_inside_its_panel_and_keeps_the_layout(case, recwarn):
    """A task's metadata (60 entries, some long values) is set in columns inside the run panel, every entry
    shown, and constrained layout still applies (it warned and squeezed the other panels before)."""
    pair, result = case
    metadata = {f"entry_{i:02d}": 0.123456 * i for i in range(59)}
    metadata["stamp_statistics"] = {"n_pixels": list(range(40))}
    fig = diagnostic_figure(
        pair.science, pair.template, types.SimpleNamespace(**{**vars(result), "metadata": metadata})
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    assert not [w for w in recwarn if "layout" in str(w.message)]
    panel = _titled(fig, "run")[0]
    texts = panel.texts
    assert len(texts) >= 2
    shown = "\n".join(t.get_text() for t in texts).split("\n")
    assert len(shown) == 60 and "entry_58: 7.16" in shown and shown[-1].endswith("…")
    renderer = canvas.get_renderer()
    figure_box = fig.bbox
    for t in texts:
        box = t.get_window_extent(renderer)
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0, t.get_text()[:40]
    # the image panels keep their size: the top row's axes are not collapsed by the text
    assert all(ax.get_position().height > 0.2 for ax in _titled(fig, "science"))


def test_kernel_panels_show_the_kernel_at_a_3x3_grid_over_the_science_box(case):
    pair, result = case
    fig = diagnostic_figure(pair.science, pair.template, result)
    kernel = result.psf_matching_kernel
    # centres of a 3 × 3 tiling of the 128 × 96 box at xy0 (100, 200)
    xs = 100 + np.array([1, 3, 5]) / 6 * 127
    ys = 200 + np.array([1, 3, 5]) / 6 * 95
    expected = {(round(x), round(y)): np.asarray(kernel.image(x, y)) for y in ys for x in xs}
    shown = {}
    for ax in fig.axes:
        if ax.get_images() and not ax.get_xticks().size:
            label = ax.texts[0].get_text()
            x, y = (int(v) for v in label.split("\n")[0].strip("()").split(","))
            shown[(x, y)] = np.asarray(ax.get_images()[0].get_array())
            assert abs(float(label.split("Σ=")[1]) - expected[(x, y)].sum()) < 1e-4
    assert shown.keys() == expected.keys()
    for key, image in shown.items():
        np.testing.assert_allclose(image, expected[key], atol=1e-9)
    # the kernel varies over the box, and so do the panels
    sums = [image.sum() for image in shown.values()]
    assert max(sums) - min(sums) > 0.1


def test_histogram_is_of_normalised_residuals_with_unit_gaussian(case):
    pair, result = case
    fig = diagnostic_figure(pair.science, pair.template, result)
    ax = _titled(fig, "difference / √variance")[0]
    heights = np.array([p.get_height() for p in ax.patches])
    widths = np.array([p.get_width() for p in ax.patches])
    assert heights.size == 120
    assert abs(np.sum(heights * widths) - 1.0) < 1e-6  # a density
    (gaussian,) = [line for line in ax.get_lines() if line.get_label() == "N(0, 1)"]
    xs, ys = gaussian.get_data()
    assert abs(ys[np.argmin(np.abs(xs))] - 1 / np.sqrt(2 * np.pi)) < 1e-3
    # the residuals have unit variance here, so the histogram peaks near the Gaussian's peak
    assert abs(heights.max() - 1 / np.sqrt(2 * np.pi)) < 0.05
    assert "std 1.0" in ax.texts[0].get_text() or "std 0.9" in ax.texts[0].get_text()


def test_transients_are_circled_on_science_and_difference(case):
    pair, result = case
    fig = diagnostic_figure(pair.science, pair.template, result, truth=pair.truth)
    expected = np.column_stack([pair.truth.transients_x, pair.truth.transients_y])
    circled = [ax for ax in fig.axes if ax.collections and "injected" in ax.get_title()]
    assert {ax.get_title().split(" ")[0].rstrip(";") for ax in circled} == {"science", "difference"}
    for ax in circled:
        np.testing.assert_allclose(ax.collections[0].get_offsets(), expected)
    no_truth = diagnostic_figure(pair.science, pair.template, result)
    assert not any(ax.collections for ax in no_truth.axes if ax.get_title().startswith("science"))


def test_writes_png_atomically(case, tmp_path):
    pair, result = case
    path = tmp_path / "diag.png"
    diagnostic_figure(pair.science, pair.template, result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (1050, 1600)
    assert os.listdir(tmp_path) == ["diag.png"]
    with pytest.raises(OSError):
        diagnostic_figure(pair.science, pair.template, result, tmp_path / "missing" / "diag.png")
    assert os.listdir(tmp_path) == ["diag.png"]
