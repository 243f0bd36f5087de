"""ALGORITHM §15 "How we know it is right", through the task API (`jd.AlardLuptonSubtract`)."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.wcs import WCS

import jaxdiff as jd
from jaxdiff._stats import clipped_mean_std, standard_good
from jaxdiff.sim import reference_pair

MODES = ("convolveTemplate", "convolveScience", "auto")


def task(**fields) -> jd.AlardLuptonSubtract:
    """The task with §15's reference setting: kernel sources may lie near the edge unless stated."""
    fields.setdefault("restrict_kernel_edge_sources", False)
    return jd.AlardLuptonSubtract(**fields)


def good_pixels(e: jd.Exposure) -> np.ndarray:
    return np.asarray(standard_good(e.image, e.variance, e.mask, e.mask_planes))


def diff_stats(e: jd.Exposure, where=None):
    """(clipped mean, plain std, variance-plane mean, N) over the standard-good pixels (and `where`)."""
    good = good_pixels(e) if where is None else good_pixels(e) & where
    img = np.asarray(e.image, np.float64)
    mean = float(clipped_mean_std(img, good)[0])
    return mean, float(np.std(img[good])), float(np.mean(np.asarray(e.variance)[good])), int(good.sum())


def lag1(img, region) -> float:
    """Neighbour (lag-1, both axes) correlation over pairs inside `region`, normalised by the mean square."""
    img = np.asarray(img, np.float64)
    img = img - img[region].mean()
    pr = region[:, 1:] & region[:, :-1]
    pc = region[1:, :] & region[:-1, :]
    num = np.sum((img[:, 1:] * img[:, :-1])[pr]) + np.sum((img[1:, :] * img[:-1, :])[pc])
    return float(num / (pr.sum() + pc.sum()) / np.mean(img[region] ** 2))


def with_fields(e: jd.Exposure, **changes) -> jd.Exposure:
    kw = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
    kw.update(changes)
    return jd.Exposure(**kw)


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def default_pair():
    return reference_pair(science_sigma=2.4, template_sigma=2.0, template_border=20)


@pytest.fixture(scope="module")
def default_run(default_pair):
    p = default_pair
    return task().run(p.template, p.science, p.sources)


# ---------------------------------------------------------------- 1, 2: misuse


def test_bad_mode_names_the_modes(default_pair):
    p = default_pair
    with pytest.raises(jd.UnsupportedModeError) as info:
        task(mode="aotu").run(p.template, p.science, p.sources)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    for mode in MODES:
        assert mode in str(info.value)


def test_template_smaller_than_science():
    science = reference_pair((220, 220)).science
    template = reference_pair((200, 200)).template
    with pytest.raises(ValueError, match="does not cover"):
        task().run(template, science, reference_pair((220, 220)).sources)


def test_wcs_mismatch(default_pair):
    p = default_pair
    w1, w2 = WCS(naxis=2), WCS(naxis=2)
    for w, ra in ((w1, 10.0), (w2, 10.1)):
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra, 20.0]
        w.wcs.crpix = [100.0, 100.0]
        w.wcs.cdelt = [-5e-5, 5e-5]
    with pytest.raises(ValueError, match="WCS"):
        task().run(with_fields(p.template, wcs=w1), with_fields(p.science, wcs=w2), p.sources)


# ---------------------------------------------------------------- 3: coverage


def partial_template(c: float):
    p = reference_pair((400, 400), n_stars=80, science_sigma=2.4, template_sigma=2.0, template_border=20)
    t = p.template
    col = int(400 * c + 20)
    img = np.array(t.image)
    mask = np.array(t.mask)
    img[:, col:] = 0.0
    mask[:, col:] |= 1 << dict(t.mask_planes)["NO_DATA"]
    return p, with_fields(t, image=img, mask=mask)


def test_no_work_found_at_low_coverage():
    p, t = partial_template(0.09)
    with pytest.raises(jd.NoWorkFound, match="9.0%"):
        jd.AlardLuptonSubtract(restrict_kernel_edge_sources=True).run(t, p.science, p.sources)


def test_data_checks_come_before_coverage_and_sources():
    """With given sources the task checks the variance planes while the subtraction runs; an invalid variance
    is still the error reported when the coverage is too low or no source is valid as well."""
    p, t = partial_template(0.09)
    variance = np.array(p.science.variance)
    variance[20, 30] = -1.0
    science = eqx.tree_at(lambda e: e.variance, p.science, jnp.asarray(variance))
    with pytest.raises(ValueError, match="science variance must be finite"):
        jd.AlardLuptonSubtract().run(t, science, p.sources)
    none_valid = eqx.tree_at(lambda s: s.valid, p.sources, jnp.zeros_like(p.sources.valid))
    with pytest.raises(ValueError, match="science variance must be finite"):
        jd.AlardLuptonSubtract().run(p.template, science, none_valid)


@pytest.mark.slow
def test_no_work_found_after_fit_failure():
    p, t = partial_template(0.15)
    with pytest.raises(jd.NoWorkFound, match="kernel fit failed"):
        jd.AlardLuptonSubtract(restrict_kernel_edge_sources=True).run(t, p.science, p.sources)


@pytest.mark.slow
def test_success_at_high_coverage():
    p, t = partial_template(0.7)
    r = jd.AlardLuptonSubtract(restrict_kernel_edge_sources=True).run(t, p.science, p.sources)
    assert r.metadata["template_coverage"] == pytest.approx(0.7, abs=0.01)
    assert r.metadata["n_stamps_used"] >= 3


# ---------------------------------------------------------------- 5, 7, 11: difference statistics


@pytest.mark.slow
@pytest.mark.parametrize("detected", [True, False])
def test_equal_images(detected):
    p = reference_pair(science_sigma=2.4, template_sigma=2.4, template_border=20, add_detected=detected)
    d = task().run(p.template, p.science, p.sources).difference
    mean, std, _, n = diff_stats(d)
    assert np.all(np.isfinite(np.asarray(d.image)))
    assert abs(mean) < 5 / np.sqrt(n)
    assert std == pytest.approx(np.sqrt(2), rel=0.1)


def noise_only(pair) -> np.ndarray:
    """Science pixels where both inputs' variance planes are their noise n² (the stars' √|noiseless| term below
    0.1 % of it): the simulation draws no Poisson noise, so near stars its variance planes exceed the pixel
    noise and difference statistics there say nothing about s² + t² (with n = 0.1 that reaches 14 px out)."""
    sci, tmpl = pair.science, pair.template
    (sx0, sy0, _, _), (tx0, ty0, _, _) = sci.bbox, tmpl.bbox
    ny, nx = sci.shape
    t_var = np.asarray(tmpl.variance)[sy0 - ty0 : sy0 - ty0 + ny, sx0 - tx0 : sx0 - tx0 + nx]
    s_var = np.asarray(sci.variance)
    return (s_var <= 1.001 * np.min(s_var)) & (t_var <= 1.001 * np.min(t_var))


def check_noise(result, s, t, pair=None):
    md = result.metadata
    assert md["science_variance_factor"] == pytest.approx(1, abs=0.05)
    assert md["template_variance_factor"] == pytest.approx(1, abs=0.05)
    d = result.difference
    assert np.all(np.isfinite(np.asarray(d.image)))
    mean, std, vmean, n = diff_stats(d, None if pair is None else noise_only(pair))
    assert abs(mean) < 5 * (s + t) / np.sqrt(n)
    assert vmean == pytest.approx(s**2 + t**2, rel=0.1)
    assert std == pytest.approx(np.sqrt(s**2 + t**2), rel=0.1)


def test_noise_default_mode(default_run):
    check_noise(default_run, 1.0, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "noise",
    [
        (1.0, 1.0),
        (1.0, 0.1),
        (0.1, 0.1),
    ],
)
@pytest.mark.parametrize("mode", ["convolveTemplate", "convolveScience"])
def test_noise_both_modes(mode, noise):
    s, t = noise
    sig = (2.4, 2.0) if mode == "convolveTemplate" else (2.0, 2.4)
    p = reference_pair(
        science_sigma=sig[0], template_sigma=sig[1], science_noise=s, template_noise=t, template_border=20
    )
    r = task(mode=mode).run(p.template, p.science, p.sources)
    assert r.metadata["mode"] == mode
    check_noise(r, s, t, p)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [2.4, 2.0, 2.8])
def test_equal_psfs(sigma):
    p = reference_pair(
        science_sigma=sigma, template_sigma=sigma, science_noise=0.1, template_noise=0.1, add_detected=False
    )
    raw = np.asarray(p.science.image) - np.asarray(p.template.image)
    runs = [
        task().run_convolve_template(p.template, p.science, p.sources),
        task().run_convolve_science(p.template, p.science, p.sources),
    ]
    diffs = [r.difference for r in runs]
    for d in diffs:
        assert np.max(np.abs(np.asarray(d.image) - raw)) < 0.5
    a, b = diffs
    assert np.max(np.abs(np.asarray(a.image) - np.asarray(b.image))) < 1.0
    assert np.max(np.abs(np.asarray(a.variance) - np.asarray(b.variance))) < 1.0
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))


# ---------------------------------------------------------------- 6, 8: modes


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "forced"), [((2.4, 2.0), "convolveTemplate"), ((2.0, 2.4), "convolveScience")])
def test_auto_equals_forced(sig, forced):
    p = reference_pair(science_sigma=sig[0], template_sigma=sig[1], template_border=20)
    a = task(mode="auto").run(p.template, p.science, p.sources)
    f = task(mode=forced).run(p.template, p.science, p.sources)
    assert a.metadata["mode"] == forced
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(np.asarray(getattr(a.difference, name)), np.asarray(getattr(f.difference, name)))


@pytest.mark.slow
def test_swapped_inputs():
    p = reference_pair(science_sigma=2.0, template_sigma=2.4)
    t = task(mode="auto")
    d1 = t.run(p.template, p.science, p.sources).difference
    d2 = t.run(p.science, p.template, p.sources).difference
    good = good_pixels(d1) & good_pixels(d2)
    delta = np.asarray(d2.image, np.float64) - np.asarray(d1.image, np.float64)
    n = int(good.sum())
    assert abs(float(clipped_mean_std(delta, good)[0])) < 10 / np.sqrt(n)
    assert float(np.std(delta[good])) == pytest.approx(2 * np.sqrt(2), rel=0.1)


# ---------------------------------------------------------------- 9: too few sources


def test_one_source(default_pair):
    p = default_pair
    x0, y0 = np.asarray(p.science.xy0) + 128
    i = int(np.argmin(np.hypot(np.asarray(p.sources.x) - x0, np.asarray(p.sources.y) - y0)))
    one = jd.Sources(p.sources.x[i : i + 1], p.sources.y[i : i + 1], p.sources.flux[i : i + 1])
    with pytest.raises(jd.InsufficientKernelSourcesError) as info:
        task().run(p.template, p.science, one)
    assert info.value.n_sources == 1
    assert info.value.n_required == 3
    assert "only 1 usable kernel sources, 3 required" in str(info.value)


# ---------------------------------------------------------------- 12: background


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["convolveTemplate", "convolveScience"])
def test_background(mode):
    coeffs = np.array([2.2, 2.1, 2.0, 1.2, 1.1, 1.0])
    sig = (2.0, 2.0)
    p = reference_pair(
        (512, 512),
        xy0=(123, 456),
        science_sigma=sig[0],
        template_sigma=sig[1],
        template_border=20,
        background=coeffs,
    )
    r = task(mode=mode, do_subtract_background=True).run(p.template, p.science, p.sources)
    np.testing.assert_allclose(np.asarray(r.background_model.coefficients), coeffs, rtol=0.3)
    _, std, _, _ = diff_stats(r.difference)
    assert std == pytest.approx(np.sqrt(2), rel=0.1)


# ---------------------------------------------------------------- 13: variance factors


@pytest.fixture(scope="module")
def variance_pairs():
    out = {}
    for mode, sig in (("convolveTemplate", (2.4, 2.0)), ("convolveScience", (2.0, 2.4))):
        p = reference_pair(
            science_sigma=sig[0],
            template_sigma=sig[1],
            science_noise=4.0,
            template_noise=2.0,
            template_border=20,
        )
        out[mode] = p
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["convolveTemplate", "convolveScience"])
@pytest.mark.parametrize("decorrelate", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("divisor", [1.0, 1.345])
def test_variance_factors(variance_pairs, mode, decorrelate, rescale, divisor):
    p = variance_pairs[mode]
    t = with_fields(p.template, variance=np.asarray(p.template.variance) / divisor)
    s = with_fields(p.science, variance=np.asarray(p.science.variance) / divisor)
    r = task(mode=mode, do_decorrelation=decorrelate, do_scale_variance=rescale).run(t, s, p.sources)
    f = divisor if rescale else 1.0
    assert r.metadata["science_variance_factor"] == pytest.approx(f, abs=0.05)
    assert r.metadata["template_variance_factor"] == pytest.approx(f, abs=0.05)
    svar = float(clipped_mean_std(s.variance, good_pixels(s))[0])
    t_cut = np.asarray(t.variance)[20:-20, 20:-20]
    tvar = float(clipped_mean_std(t_cut, good_pixels(t)[20:-20, 20:-20])[0])
    d = r.difference
    planes = dict(d.mask_planes)
    excl = sum(1 << planes[n] for n in ("EDGE", "BAD", "NO_DATA"))
    keep = (np.asarray(d.mask) & excl) == 0
    vmean = float(np.mean(np.asarray(d.variance)[keep]))
    k0 = r.metadata["kernel_sum"]
    if decorrelate:
        expected = f * (svar + tvar)
    elif mode == "convolveTemplate":
        expected = f * svar + float(np.mean(np.asarray(r.matched_template.variance)[keep]))
    else:
        ksq = float(np.sum(np.asarray(r.psf_matching_kernel.image()) ** 2))
        expected = ksq * f * svar / k0**2 + f * tvar / k0**2
    assert vmean == pytest.approx(expected, rel=0.1)


# ---------------------------------------------------------------- 14: properties


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["convolveTemplate", "convolveScience"])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_properties(mode, decorrelate):
    sig = (2.4, 2.0) if mode == "convolveTemplate" else (2.0, 2.4)
    p = reference_pair(science_sigma=sig[0], template_sigma=sig[1], template_border=20)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.crpix = [100.0, 100.0]
    w.wcs.cdelt = [-5e-5, 5e-5]
    s = with_fields(p.science, wcs=w, photo_calib=2.5)
    t = with_fields(p.template, wcs=w, photo_calib=0.5)
    r = task(mode=mode, do_decorrelation=decorrelate).run(t, s, p.sources)
    d = r.difference
    assert d.wcs is w
    assert float(d.photo_calib) == 2.5
    expected_psf = (s if mode == "convolveTemplate" else t).psf.image()
    # the core gives PSFs the side of a size bucket (41 here): image PSFs zero-padded, Gaussians drawn at that side
    size = d.psf.image().shape[-1]
    psf = (s if mode == "convolveTemplate" else t).psf
    if isinstance(psf, jd.GaussianPsf):
        expected_psf = jd.GaussianPsf(psf.width, size).image()
    else:
        expected_psf = np.pad(np.asarray(expected_psf), (size - expected_psf.shape[-1]) // 2)
    if decorrelate:
        assert float(np.sum(np.asarray(d.psf.image()))) == pytest.approx(1.0, abs=1e-6)
        assert d.psf.image().shape == expected_psf.shape
    else:
        np.testing.assert_allclose(np.asarray(d.psf.image()), np.asarray(expected_psf), atol=1e-12)


# ---------------------------------------------------------------- metadata


def test_metadata_plain_python(default_run):
    md = default_run.metadata
    required = (
        "mode",
        "n_stamps",
        "n_stamps_used",
        "kernel_sum",
        "residual_mean",
        "residual_std",
        "condition_number",
        "template_coverage",
    )
    for key in required:
        assert key in md
        assert type(md[key]) in (int, float, str, bool), (key, type(md[key]))
    assert md["mode"] == "convolveTemplate"
    assert isinstance(md["n_stamps"], int) and isinstance(md["n_stamps_used"], int)
    assert 3 <= md["n_stamps_used"] <= md["n_stamps"]
    assert md["kernel_sum"] == pytest.approx(1.0, abs=0.05)
    assert md["template_coverage"] == 1.0
    assert abs(md["residual_mean"]) < 0.25 and 0 < md["residual_std"] < 1.5
    assert md["condition_number"] > 1
    timing = {k: v for k, v in md.items() if k.startswith("timing.")}
    assert "timing.total" in timing
    assert all(type(v) is float and v >= 0 for v in timing.values())
    assert timing["timing.total"] >= max(v for k, v in timing.items() if k != "timing.total")


# ---------------------------------------------------------------- decorrelation on a real subtraction


@pytest.fixture(scope="module")
def decorrelation_runs():
    p = reference_pair(
        science_sigma=2.4,
        template_sigma=2.0,
        science_noise=1.0,
        template_noise=10.0,
        template_border=20,
        flux_range=(5e4, 1e5),
    )
    raw = task(do_decorrelation=False).run(p.template, p.science, p.sources)
    dec = task().run(p.template, p.science, p.sources)
    stars = np.asarray(p.truth.noiseless_science)
    quiet = (stars < 1e-3) & good_pixels(raw.difference) & good_pixels(dec.difference)
    # stay away from the image border (decorrelation filter wrap) and from stars convolved by the kernel
    quiet[:24], quiet[-24:], quiet[:, :24], quiet[:, -24:] = False, False, False, False
    return p, raw, dec, quiet


def test_decorrelation_on_subtraction(decorrelation_runs):
    p, raw, dec, quiet = decorrelation_runs
    assert quiet.sum() > 10000
    expected = dec.metadata["svar"] + dec.metadata["tvar"] * dec.metadata["kernel_sum"] ** 2
    img = np.asarray(dec.difference.image, np.float64)
    assert float(np.var(img[quiet])) == pytest.approx(expected, rel=0.05)
    assert float(np.mean(np.asarray(dec.difference.variance)[quiet])) == pytest.approx(expected, rel=0.05)
    assert lag1(raw.difference.image, quiet) > 0.2
    assert abs(lag1(dec.difference.image, quiet)) < 0.1


@pytest.mark.slow
def test_spatially_varying_finalize(decorrelation_runs):
    p, raw, dec, quiet = decorrelation_runs
    t = task()
    out = t.finalize(p.template, p.science, raw.difference, raw.psf_matching_kernel, spatially_varying=True)
    expected = dec.metadata["svar"] + dec.metadata["tvar"] * dec.metadata["kernel_sum"] ** 2
    img = np.asarray(out.image, np.float64)
    assert float(np.var(img[quiet])) == pytest.approx(expected, rel=0.05)
    assert float(np.mean(np.asarray(out.variance)[quiet])) == pytest.approx(expected, rel=0.05)
    assert abs(lag1(out.image, quiet)) < 0.1
    # agrees with the constant-filter result where the kernel barely varies
    np.testing.assert_allclose(
        np.asarray(out.variance)[quiet].mean(), np.asarray(dec.difference.variance)[quiet].mean(), rtol=0.03
    )


# ---------------------------------------------------------------- 16, 17: preconvolution (score image)


def nea(psf) -> float:
    """Noise-equivalent area 1/ΣP² of a PSF at its centre."""
    return float(1.0 / np.sum(np.asarray(psf.image(), np.float64) ** 2))


def test_preconvolution_even_psf(default_pair):
    p = default_pair
    even = np.ones((30, 30)) / 900.0
    with pytest.raises(ValueError, match="odd-sized"):
        task(use_preconvolution=True).run(p.template, with_fields(p.science, psf=even), p.sources)


@pytest.mark.slow
def test_score_equal_psfs():
    p = reference_pair((400, 400), science_sigma=2.4, template_sigma=2.4, template_border=20)
    r = task(use_preconvolution=True, mode="convolveScience").run(p.template, p.science, p.sources)
    assert r.metadata["mode"] == "convolveTemplate"  # preconvolution always convolves the template
    assert r.metadata["n_interpolated"] == 0
    d = r.difference
    assert np.all(np.isfinite(np.asarray(d.image)))
    mean, std, _, n = diff_stats(d)
    assert abs(mean) < 5 / np.sqrt(n)
    assert std == pytest.approx(np.sqrt(2) / np.sqrt(nea(p.science.psf)), rel=0.1)
    # PSF = science PSF; EDGE on the ring outside the inner box
    np.testing.assert_allclose(np.asarray(d.psf.image()), np.asarray(p.science.psf.image()), atol=1e-12)
    edge = (np.asarray(d.mask) & (1 << dict(d.mask_planes)["EDGE"])) != 0
    assert edge[:15].all() and edge[:, -15:].all() and not edge[15:-15, 15:-15].any()


# T σ 2.0 → k 33 (bucket 35): stamps (71 px) ≥ 2k from the edge of a 256² box leave 3 of the 20 stars (condition number
# < 0, kernel sum 1.022); score std 0.072 (0.113 before EDGE pixels were kept out of the decorrelation filter).
# On 400² with 50 stars (24 stamps) the same pair gives 0.0553 (0.0534 with the true kernel).
FEW_SCORE_STAMPS = "score std 0.072 vs 0.0499 ± 10 %: only 3 stamps fit on 256² at k 33 (fewer at bucket 35)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "template_sigma",
    [
        2.8,
        pytest.param(2.0, marks=pytest.mark.xfail(strict=True, reason=FEW_SCORE_STAMPS)),
    ],
)
def test_score_different_psfs(template_sigma):
    p = reference_pair(science_sigma=2.4, template_sigma=template_sigma, science_noise=0.3, template_noise=0.3)
    r = task(use_preconvolution=True).run(p.template, p.science, p.sources)
    mean, std, _, n = diff_stats(r.difference)
    assert abs(mean) < 3 / np.sqrt(n)
    assert std == pytest.approx(0.3 * np.sqrt(2) / np.sqrt(nea(p.science.psf)), rel=0.1)


@pytest.mark.slow
def test_score_finalize_matches_run():
    p = reference_pair((400, 400), science_sigma=2.4, template_sigma=2.0, template_border=20)
    raw = task(use_preconvolution=True, do_decorrelation=False).run(p.template, p.science, p.sources)
    dec = task(use_preconvolution=True).run(p.template, p.science, p.sources)
    kernel = np.asarray(p.science.psf.image())
    out = task().finalize(
        p.template, p.science, raw.difference, raw.psf_matching_kernel, preconv_mode=True, preconv_kernel=kernel
    )
    good = good_pixels(dec.difference)
    _, std, _, _ = diff_stats(dec.difference)
    assert float(np.std(np.asarray(out.image)[good])) == pytest.approx(std, rel=0.03)
    assert float(np.mean(np.asarray(out.variance)[good])) == pytest.approx(
        float(np.mean(np.asarray(dec.difference.variance)[good])), rel=0.03
    )


def test_staged_task_equals_fused_subtract(default_pair, default_run):
    """`staged=True` jits and times each stage separately; the default runs them fused in one program."""
    p = default_pair
    staged = jd.AlardLuptonSubtract(task().config, staged=True).run(p.template, p.science, p.sources)
    for name in ("difference", "matched_template"):
        a, b = getattr(staged, name), getattr(default_run, name)
        np.testing.assert_allclose(np.asarray(a.image), np.asarray(b.image), rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(a.variance), np.asarray(b.variance), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert staged.metadata["n_stamps_used"] == default_run.metadata["n_stamps_used"]
    stages = ("checks", "prepare", "select", "fit", "difference", "total")
    assert all(staged.metadata[f"timing.{s}"] > 0 for s in stages)
    assert all(default_run.metadata[f"timing.{s}"] > 0 for s in ("checks", "subtract", "total"))


@pytest.mark.parametrize("bad", [-1.0, np.inf, np.nan])
def test_bad_variance_raises(default_pair, bad):
    p = default_pair
    variance = np.array(p.science.variance)
    variance[20, 30] = bad
    science = eqx.tree_at(lambda e: e.variance, p.science, jnp.asarray(variance))
    with pytest.raises(ValueError, match=r"science variance must be finite and >= 0.*; 1 pixels are not"):
        task().run(p.template, science, p.sources)
