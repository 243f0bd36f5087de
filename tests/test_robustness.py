"""Robustness matrix of issue 8 on small simulated pairs: bad pixels, bad variances, bad geometry, bad source
lists, extreme values, byte order, determinism and the CLI's no-partial-output guarantee.

Most tests share one pair, one source count and the default config, so that they reuse one compiled program.
"""

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import jaxdiff as jd
from jaxdiff._cli import main
from jaxdiff._mask import plane_bit
from jaxdiff.sim import reference_pair

SHAPE = (160, 160)


@pytest.fixture(scope="module")
def pair():
    return reference_pair(SHAPE, n_stars=30, seed=1, flux_range=(3000, 8000), xy0=(0, 0))


@pytest.fixture(scope="module")
def task():
    return jd.AlardLuptonSubtract()


@pytest.fixture(scope="module")
def base(pair, task):
    return task.run(pair.template, pair.science, pair.sources)


@pytest.fixture(scope="module")
def base_z(base):
    """Normalised noise of the clean difference off stars (measured 0.905 on this pair)."""
    d = base.difference
    free = _star_free(d)
    return _robust_sigma(np.asarray(d.image)[free] / np.sqrt(np.asarray(d.variance)[free]))


def _replace(e, **kw):
    args = dict(image=e.image, variance=e.variance, mask=e.mask, psf=e.psf, xy0=e.xy0, photo_calib=e.photo_calib)
    args.update(kw)
    return jd.Exposure(**args, wcs=e.wcs, mask_planes=e.mask_planes)


def _bit(e, name):
    return 1 << plane_bit(e.mask_planes, name)


def _robust_sigma(v) -> float:
    v = np.asarray(v)[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _star_free(diff, exclude=()):
    """Pixels of the difference with no DETECTED (or other listed) bit, as a boolean map."""
    names = ("DETECTED", "NO_DATA", "BAD", "SAT", *exclude)
    bits = sum(_bit(diff, n) for n in names)
    return (np.asarray(diff.mask) & bits) == 0


def _grown(shape, rows, cols, half):
    near = np.zeros(shape, bool)
    near[max(rows.start - half, 0) : rows.stop + half, max(cols.start - half, 0) : cols.stop + half] = True
    return near


def _usable_star(pair, margin=45):
    """(row, col) of the first source well inside the box (its stamp is used in the base fit)."""
    x, y = np.asarray(pair.sources.x), np.asarray(pair.sources.y)
    inner = (x > margin) & (x < SHAPE[1] - margin) & (y > margin) & (y < SHAPE[0] - margin)
    i = int(np.flatnonzero(inner)[0])
    return int(round(y[i])), int(round(x[i]))


# ---------------------------------------------------------------------------------- bad pixel values


@pytest.mark.parametrize(
    "where, value",
    [("science", np.inf), ("template", -np.inf), ("science", np.nan), ("template", np.nan)],
    ids=["inf-science", "-inf-template", "nan-science", "nan-template"],
)
def test_nonfinite_pixels_masked_and_excluded(pair, task, base, base_z, where, value):
    """A non-finite block on a kernel star and a lone pixel elsewhere: flagged NO_DATA, the star's stamp is
    dropped, and the difference stays finite and noise-like beyond the kernel footprint."""
    r, c = _usable_star(pair)
    block = (slice(r - 2, r + 3), slice(c - 2, c + 3))
    e = getattr(pair, where)
    img = np.array(e.image)
    img[block] = value
    img[20, 140] = value
    e = _replace(e, image=img)
    template, science = (e, pair.science) if where == "template" else (pair.template, e)
    res = task.run(template, science, pair.sources)
    d = res.difference
    img_d, mask_d = np.asarray(d.image), np.asarray(d.mask)
    assert np.all((mask_d[block] & _bit(d, "NO_DATA")) != 0)
    assert mask_d[20, 140] & _bit(d, "NO_DATA")
    assert res.metadata["n_stamps"] < base.metadata["n_stamps"]
    half = res.metadata["kernel_size"] // 2
    near = _grown(SHAPE, *block, half) | _grown(SHAPE, slice(20, 21), slice(140, 141), half)
    assert np.all(np.isfinite(img_d[~near])), "non-finite values spread beyond the kernel footprint"
    assert np.all(np.isfinite(np.asarray(d.variance)[~near]))
    free = _star_free(d) & ~near
    z = _robust_sigma(img_d[free] / np.sqrt(np.asarray(d.variance)[free]))
    assert z == pytest.approx(base_z, abs=0.03)


@pytest.mark.parametrize("where", ["science", "template"])
@pytest.mark.parametrize("masked", [True, False], ids=["SAT", "unmasked"])
def test_extreme_pixel_values_stay_local(pair, task, base, where, masked):
    """1e30 (a fill sentinel) in one pixel, flagged SAT or not: treated as missing data, and the rest of the
    difference equals the clean run's (without the fix it leaked ~1e23 into every pixel via the FFTs)."""
    e = getattr(pair, where)
    img, mask = np.array(e.image), np.array(e.mask)
    img[40, 120] = 1e30
    if masked:
        mask[40, 120] |= _bit(e, "SAT")
    e = _replace(e, image=img, mask=mask)
    template, science = (e, pair.science) if where == "template" else (pair.template, e)
    res = task.run(template, science, pair.sources)
    d = res.difference
    half = res.metadata["kernel_size"] // 2
    outside = ~_grown(SHAPE, slice(40, 41), slice(120, 121), half)
    far = ~_grown(SHAPE, slice(40, 41), slice(120, 121), 2 * half)  # beyond the decorrelation filter too
    img_d = np.asarray(d.image)
    assert np.all(np.isfinite(img_d[outside]))
    assert np.asarray(d.mask)[40, 120] & _bit(d, "NO_DATA")
    if masked:  # a template SAT pixel lands in SAT_TEMPLATE
        assert np.asarray(d.mask)[40, 120] & _bit(d, "SAT" if where == "science" else "SAT_TEMPLATE")
    noise = float(np.sqrt(np.median(np.asarray(base.difference.variance))))
    # measured beyond 2·half: 8e-5 σ (science), 3.3e-3 σ (template: one stamp fewer, the kernel changes slightly)
    assert np.max(np.abs(img_d[far] - np.asarray(base.difference.image)[far])) < 0.05 * noise
    assert np.max(np.asarray(d.variance)[far]) < 10 * np.max(np.asarray(base.difference.variance))


def test_all_masked_region(pair, task, base_z):
    """A dead 30×30 corner (BAD, image 0, variance 0) in the science and a BAD corner in the template: both are
    masked in the difference, which is finite everywhere and noise-like outside them."""
    sci_block = (slice(0, 30), slice(0, 30))
    tmp_block = (slice(130, 160), slice(130, 160))
    s_img, s_var, s_mask = (np.array(a) for a in (pair.science.image, pair.science.variance, pair.science.mask))
    s_img[sci_block], s_var[sci_block] = 0.0, 0.0
    s_mask[sci_block] |= _bit(pair.science, "BAD")
    t_mask = np.array(pair.template.mask)
    t_mask[tmp_block] |= _bit(pair.template, "BAD")
    science = _replace(pair.science, image=s_img, variance=s_var, mask=s_mask)
    template = _replace(pair.template, mask=t_mask)
    res = task.run(template, science, pair.sources)
    d = res.difference
    img, var, mask = np.asarray(d.image), np.asarray(d.variance), np.asarray(d.mask)
    bad = _bit(d, "BAD")
    assert np.all((mask[sci_block] & bad) != 0)
    assert np.all((mask[tmp_block] & bad) != 0)
    assert np.all(np.isfinite(img)) and np.all(np.isfinite(var))
    half = res.metadata["kernel_size"] // 2
    free = _star_free(d) & ~_grown(SHAPE, *sci_block, half) & ~_grown(SHAPE, *tmp_block, half)
    assert _robust_sigma(img[free] / np.sqrt(var[free])) == pytest.approx(base_z, abs=0.03)


# ---------------------------------------------------------------------------------- bad variances


def test_negative_variance_rejected(pair, task):
    var = np.array(pair.science.variance)
    var[10, 10] = -1.0
    with pytest.raises(ValueError, match="variance.*>= 0"):
        task.run(pair.template, _replace(pair.science, variance=var), pair.sources)


def test_zero_variance_pixels_unusable(pair, task, base, base_z):
    """Zero variance on a kernel star's core and on 5 template pixels near the edge: the star is not a stamp,
    nothing turns NaN, the result is noise-like."""
    r, c = _usable_star(pair)
    s_var = np.array(pair.science.variance)
    s_var[r - 1 : r + 2, c - 1 : c + 2] = 0.0
    t_var = np.array(pair.template.variance)
    t_var[[3, 5, 150, 155, 80], [4, 150, 6, 157, 2]] = 0.0
    res = task.run(_replace(pair.template, variance=t_var), _replace(pair.science, variance=s_var), pair.sources)
    d = res.difference
    img, var = np.asarray(d.image), np.asarray(d.variance)
    assert res.metadata["n_stamps"] < base.metadata["n_stamps"]
    assert np.all(np.isfinite(img)) and np.all(np.isfinite(var)) and np.all(var > 0)
    free = _star_free(d)
    assert _robust_sigma(img[free] / np.sqrt(var[free])) == pytest.approx(base_z, abs=0.03)


def test_all_zero_variance_raises(pair, task):
    science = _replace(pair.science, variance=np.zeros(SHAPE))
    with pytest.raises(ValueError, match="science image has no finite pixel with variance > 0"):
        task.run(pair.template, science, pair.sources)


# ---------------------------------------------------------------------------------- geometry


def test_template_smaller_than_science(pair, task):
    t = pair.template
    small = jd.Exposure(
        np.asarray(t.image)[5:-5, 5:-5],
        np.asarray(t.variance)[5:-5, 5:-5],
        np.asarray(t.mask)[5:-5, 5:-5],
        t.psf,
        xy0=(5, 5),
        mask_planes=t.mask_planes,
    )
    with pytest.raises(ValueError, match="template box") as info:
        task.run(small, pair.science, pair.sources)
    msg = str(info.value)
    assert "x 5…154, y 5…154 (shape (150, 150))" in msg and "x 0…159, y 0…159 (shape (160, 160))" in msg


def test_kernel_larger_than_image(pair):
    """A kernel whose (2k + 1)² stamps exceed the image: a ValueError naming both (it used to crash in a gather)."""
    task = jd.AlardLuptonSubtract(scale_by_fwhm=False, kernel_size=101, fit_region="stamps")
    with pytest.raises(ValueError, match=r"kernel size 101 needs \(203, 203\) stamps.*\(160, 160\)"):
        task.run(pair.template, pair.science, pair.sources)
    with pytest.raises(ValueError, match="kernel size 101"):
        jd.subtract(pair.template, pair.science, pair.sources, task.config)


def test_kernel_stamps_that_cannot_fit_any_source(pair):
    """Stamps that fit the image but leave no room for any source (restricted edges): a clear
    InsufficientKernelSourcesError, no crash."""
    task = jd.AlardLuptonSubtract(scale_by_fwhm=False, kernel_size=41, fit_region="stamps")
    with pytest.raises(jd.InsufficientKernelSourcesError) as info:
        task.run(pair.template, pair.science, pair.sources)
    assert info.value.n_sources == 0


@pytest.mark.slow
def test_psf_larger_than_image(pair, task, base, base_z):
    """201² PSF models on a 160² image: the same subtraction (the PSFs only set widths and the decorrelation)."""
    t = _replace(pair.template, psf=jd.GaussianPsf(2.0, 201))
    s = _replace(pair.science, psf=jd.GaussianPsf(2.4, 201))
    res = task.run(t, s, pair.sources)
    d = res.difference
    img, var = np.asarray(d.image), np.asarray(d.variance)
    assert np.all(np.isfinite(img))
    assert res.metadata["kernel_sum"] == pytest.approx(base.metadata["kernel_sum"], rel=1e-6)
    free = _star_free(d)
    assert _robust_sigma(img[free] / np.sqrt(var[free])) == pytest.approx(base_z, abs=0.03)


# ---------------------------------------------------------------------------------- source lists


def _sources(x, y, flux):
    return jd.Sources(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float))


def test_duplicate_sources_counted_once(pair, task):
    """15 sources listed twice give exactly the result of those 15 once plus 15 outside the image."""
    x, y, f = (np.asarray(a)[:15] for a in (pair.sources.x, pair.sources.y, pair.sources.flux))
    dup = task.run(pair.template, pair.science, _sources(np.r_[x, x], np.r_[y, y], np.r_[f, f]))
    out_x, out_y = np.r_[x, np.full(15, -500.0)], np.r_[y, np.linspace(-100, 900, 15)]
    once = task.run(pair.template, pair.science, _sources(out_x, out_y, np.r_[f, f]))
    assert dup.metadata["n_stamps"] == once.metadata["n_stamps"] <= 15
    assert dup.metadata["n_candidates"] == once.metadata["n_candidates"]
    np.testing.assert_array_equal(np.asarray(dup.difference.image), np.asarray(once.difference.image))
    np.testing.assert_array_equal(
        np.asarray(dup.psf_matching_kernel.image()), np.asarray(once.psf_matching_kernel.image())
    )


def test_sources_all_outside_image(pair, task):
    xs, ys = np.linspace(-300, 500, 30), np.full(30, 1000.0)
    with pytest.raises(jd.InsufficientKernelSourcesError) as info:
        task.run(pair.template, pair.science, _sources(xs, ys, np.full(30, 1e4)))
    assert info.value.n_sources == 0 and info.value.n_required == 3


def test_no_stars_without_sources(pair, task):
    rng = np.random.default_rng(1)
    science = _replace(pair.science, image=rng.normal(0.0, 1.0, SHAPE), variance=np.ones(SHAPE), mask=None)
    with pytest.raises(jd.InsufficientKernelSourcesError) as info:
        task.run(pair.template, science, None)
    assert info.value.n_sources == 0


# ---------------------------------------------------------------------------------- byte order


def _write(path, e, dtype):
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(np.asarray(e.image).astype(dtype), name="IMAGE"),
        fits.ImageHDU(np.asarray(e.mask).astype(dtype[0] + "i4"), name="MASK"),
        fits.ImageHDU(np.asarray(e.variance).astype(dtype), name="VARIANCE"),
    ]
    fits.HDUList(hdus).writeto(path)


@pytest.mark.parametrize("dtype", [">f8", pytest.param(">f4", marks=pytest.mark.slow)])
def test_big_endian_fits(pair, task, tmp_path, dtype):
    """Big-endian arrays written by astropy read back as native arrays and subtract exactly like native ones."""
    native = dtype.replace(">", "<")
    read = {}
    for order in (dtype, native):
        for name in ("template", "science"):
            path = tmp_path / f"{name}{order[0] == '>'}.fits"
            _write(path, getattr(pair, name), order)
            e = jd.read_exposure(path)
            read[order, name] = jd.Exposure(e.image, e.variance, e.mask, getattr(pair, name).psf)
    for name in ("template", "science"):
        big, nat = read[dtype, name], read[native, name]
        assert big.image.dtype == np.dtype(native) and big.image.dtype.isnative
        np.testing.assert_array_equal(np.asarray(big.image), np.asarray(nat.image))
        np.testing.assert_array_equal(np.asarray(big.mask), np.asarray(nat.mask))
    r_big = task.run(read[dtype, "template"], read[dtype, "science"], pair.sources)
    r_nat = task.run(read[native, "template"], read[native, "science"], pair.sources)
    np.testing.assert_array_equal(np.asarray(r_big.difference.image), np.asarray(r_nat.difference.image))
    # and a big-endian numpy array straight into jd.Exposure (it used to fail inside JAX)
    img = np.asarray(pair.science.image).astype(dtype)
    e = jd.Exposure(img, np.asarray(pair.science.variance).astype(dtype), np.asarray(pair.science.mask).astype(">i4"))
    np.testing.assert_array_equal(np.asarray(e.image), img.astype(native))


# ---------------------------------------------------------------------------------- determinism


def test_task_run_is_deterministic(pair, task, base):
    again = task.run(pair.template, pair.science, pair.sources)
    for a, b in (
        (base.difference.image, again.difference.image),
        (base.difference.variance, again.difference.variance),
        (base.difference.mask, again.difference.mask),
        (base.matched_template.image, again.matched_template.image),
        (base.psf_matching_kernel.image(), again.psf_matching_kernel.image()),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_subtract_is_deterministic(pair):
    one = jd.subtract(pair.template, pair.science, pair.sources)
    two = jd.subtract(pair.template, pair.science, pair.sources)
    for a, b in ((one.difference.image, two.difference.image), (one.difference.variance, two.difference.variance)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(one.metadata["kernel_sum"]), np.asarray(two.metadata["kernel_sum"]))


# ---------------------------------------------------------------------------------- CLI output


def _cli_inputs(pair, tmp_path, science=None, template=None):
    s, t = tmp_path / "science.fits", tmp_path / "template.fits"
    jd.write_exposure(s, pair.science if science is None else science)
    jd.write_exposure(t, pair.template if template is None else template)
    return str(s), str(t)


def test_cli_failure_writes_no_output(pair, tmp_path, capsys):
    """A subtraction that fails (no kernel source survives: every listed star sits on BAD pixels) leaves no
    output file and no temporary file, and an existing output untouched."""
    mask = np.array(pair.science.mask)
    x, y = np.asarray(pair.sources.x), np.asarray(pair.sources.y)
    for xi, yi in zip(x, y, strict=True):
        mask[int(yi) - 1 : int(yi) + 2, int(xi) - 1 : int(xi) + 2] |= _bit(pair.science, "BAD")
    sci, tmpl = _cli_inputs(pair, tmp_path, science=_replace(pair.science, mask=mask))
    Table({"x": x, "y": y}).write(tmp_path / "sources.ecsv")
    out = tmp_path / "diff.fits"
    rc = main(["subtract", sci, tmpl, "-o", str(out), "--sources", str(tmp_path / "sources.ecsv")])
    assert rc == 1
    assert "usable kernel sources" in capsys.readouterr().err
    assert not out.exists()
    out.write_bytes(b"previous result")
    rc = main(["subtract", sci, tmpl, "-o", str(out), "--sources", str(tmp_path / "sources.ecsv")])
    assert rc == 1 and out.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["diff.fits", "science.fits", "sources.ecsv", "template.fits"]


def test_cli_invalid_input_writes_no_output(pair, tmp_path, capsys):
    template = _replace(pair.template, variance=np.zeros(pair.template.shape))
    sci, tmpl = _cli_inputs(pair, tmp_path, template=template)
    out = tmp_path / "diff.fits"
    assert main(["subtract", sci, tmpl, "-o", str(out)]) == 1
    assert "template image has no finite pixel with variance > 0" in capsys.readouterr().err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["science.fits", "template.fits"]
