"""Noise estimates without masks (ALGORITHM §4.1, `jaxdiff._noise`): variance factors and svar/tvar must not be
biased by stars when no DETECTED plane is set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import _noise
from jaxdiff._stats import variance_factor
from jaxdiff.sim import simulate_pair


def lsst_scenario(seed=0, n=256, n_stars=50, noise=0.2, science_sigma=3.3, template_sigma=2.2):
    """LSST's decorrelation scenario: stars of 50–30000 counts, Gaussian noise σ 0.2 with an exact constant
    variance plane, science PSF σ 3.3, template 2.2, no masks. Returns (template, science, sources, noise_s,
    noise_t) where noise_* are the noise images alone."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(20, n - 20, n_stars), rng.uniform(20, n - 20, n_stars)
    flux = rng.uniform(50, 30000, n_stars)
    yy, xx = np.mgrid[0:n, 0:n]

    def stars(sigma):
        img = np.zeros((n, n))
        for xi, yi, fi in zip(x, y, flux, strict=True):
            img += fi * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
        return img

    noise_s, noise_t = rng.normal(0, noise, (n, n)), rng.normal(0, noise, (n, n))
    var = np.full((n, n), noise**2)
    science = jd.Exposure(stars(science_sigma) + noise_s, var, psf=jd.GaussianPsf(science_sigma, 31))
    template = jd.Exposure(stars(template_sigma) + noise_t, var, psf=jd.GaussianPsf(template_sigma, 31))
    return template, science, jd.Sources(x, y, flux), noise_s, noise_t


def factors(exposure, sources, noise):
    """(factor as the subtraction estimates it, the same estimator on the noise alone over the same pixels,
    the factor without source exclusion, pixels used)."""
    good = jnp.ones(exposure.shape, bool)
    free = good & ~_noise.exposure_source_free(exposure, good, sources).excluded(exposure.shape)
    n = jnp.sum(free & jnp.isfinite(exposure.image))
    f = variance_factor(exposure.image, exposure.variance, free)[0]
    f_noise = variance_factor(jnp.asarray(noise), exposure.variance, free)[0]
    f_all = variance_factor(exposure.image, exposure.variance, good)[0]
    return float(f), float(f_noise), float(f_all), int(n)


def unmasked(e: jd.Exposure) -> jd.Exposure:
    return jd.Exposure(e.image, e.variance, psf=e.psf, xy0=e.xy0)


SCENARIOS = {
    "sparse": dict(n_stars=20),
    "crowded": dict(n_stars=800),
    "faint": dict(n_stars=400, flux_range=(100.0, 1000.0)),
    "very-bright": dict(n_stars=60, flux_range=(1e5, 1e6)),
    "moffat": dict(n_stars=150, psf_model="moffat"),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_factors_without_masks(name):
    """Simulated pairs (Poisson + read noise, exact variance planes), all masks dropped: the star bias is gone.

    Truth for each estimate is the same estimator on the noise alone over the same pixels (it carries the
    sampling noise of the IQR, ±2.3/√n, and the Poisson noise's non-Gaussian shape, not the stars); the
    estimate must also be consistent with 1 within its sampling noise."""
    with jax.enable_x64(True):
        p = simulate_pair((256, 256), seed=1, dtype=np.float64, **SCENARIOS[name])
        truth = p.truth
        for e, noiseless in ((p.science, truth.noiseless_science), (p.template, truth.noiseless_template)):
            e = unmasked(e)
            f, f_noise, f_all, n = factors(e, p.sources, np.asarray(e.image) - noiseless)
            assert n > 5000
            # 800 stars on 256² (12× the demo's density): undetected faint stars leave +2.2 % (f 1.007 against
            # 0.986 on the noise alone; 5.17 without the exclusion)
            assert f == pytest.approx(f_noise, rel=0.03 if name == "crowded" else 0.02), (f, f_noise, f_all, n)
            assert abs(f - 1) < 0.01 + 3 * 2.33 / np.sqrt(n)
    if name == "crowded":
        assert f_all > 3  # without the exclusion the stars dominate


def test_lsst_scenario_factors():
    """The scenario of issue 14 (science factor 4.11 before): within 2 % of the noise-only estimate over the
    same pixels, on four seeds; the mean over seeds within 2 % of 1."""
    with jax.enable_x64(True):
        results = []
        for seed in range(4):
            template, science, sources, noise_s, noise_t = lsst_scenario(seed)
            for e, noise in ((science, noise_s), (template, noise_t)):
                f, f_noise, f_all, n = factors(e, sources, noise)
                assert f == pytest.approx(f_noise, rel=0.02), (seed, f, f_noise, n)
                assert f_all > 1.5
                results.append(f)
    assert np.mean(results) == pytest.approx(1.0, abs=0.02)


@pytest.mark.slow
def test_lsst_scenario_512_within_two_percent():
    """At 512² (same density: 200 stars) enough pixels stay free for each factor to be within 2 % of 1."""
    with jax.enable_x64(True):
        template, science, sources, _, _ = lsst_scenario(0, n=512, n_stars=200)
        for e in (science, template):
            f, _, f_all, n = factors(e, sources, np.zeros(e.shape))
            assert f == pytest.approx(1.0, abs=0.02), (f, n)
            assert f_all > 1.5


def test_lsst_scenario_decorrelated_variance():
    """End to end: the decorrelated difference's variance plane matches its pixel variance (was 2.9× too high),
    and the metadata say how many pixels the estimates used."""
    template, science, sources, _, _ = lsst_scenario(1)
    r = jd.AlardLuptonSubtract().run(template, science, sources)
    md = r.metadata
    for key in ("science_variance_factor", "template_variance_factor"):
        assert md[key] == pytest.approx(1.0, abs=0.04)
    assert 5000 < md["science_variance_pixels"] < 256**2
    assert 5000 < md["template_variance_pixels"] < 256**2
    assert md["svar"] == pytest.approx(0.04, rel=0.04)
    assert md["tvar"] == pytest.approx(0.04, rel=0.04)
    inner = (slice(40, -40), slice(40, -40))
    pix = float(np.var(np.asarray(r.difference.image)[inner]))
    plane = float(np.mean(np.asarray(r.difference.variance)[inner]))
    assert plane == pytest.approx(0.08, rel=0.05)
    assert pix == pytest.approx(plane, rel=0.08)


def test_footprints_cover_wings_not_sky():
    """One bright Gaussian star on flat noise: the footprint reaches past the radius where the star adds 1 %
    of the noise, and leaves the rest of the image free."""
    n, sigma, flux, noise = 128, 2.5, 2e5, 1.0
    yy, xx = np.mgrid[0:n, 0:n]
    r2 = (xx - 64.3) ** 2 + (yy - 60.7) ** 2
    star = flux * np.exp(-r2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    img = star + np.random.default_rng(3).normal(0, noise, (n, n))
    fp = np.asarray(
        _noise.source_footprints(jnp.asarray(img), jnp.full((n, n), noise**2), jnp.ones((n, n), bool), sigma, half=10)
    )
    assert np.all(fp[star > 0.01 * noise])
    assert 0.02 < fp.mean() < 0.25
    # noise alone: (almost) nothing detected
    fp0 = np.asarray(
        _noise.source_footprints(
            jnp.asarray(img - star), jnp.full((n, n), noise**2), jnp.ones((n, n), bool), sigma, half=10
        )
    )
    assert fp0.mean() < 0.01


def test_overestimated_variance_still_finds_wings():
    """A variance plane 10× the pixel noise lowers every S/N by √10; the S/N image's own scale restores the
    threshold, so the footprint still covers the wing."""
    n, sigma, flux = 128, 2.5, 2e4
    yy, xx = np.mgrid[0:n, 0:n]
    star = flux * np.exp(-((xx - 64) ** 2 + (yy - 64) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    img = jnp.asarray(star + np.random.default_rng(4).normal(0, 1.0, (n, n)))
    fp_true = np.asarray(_noise.source_footprints(img, jnp.ones((n, n)), jnp.ones((n, n), bool), sigma, half=10))
    fp_high = np.asarray(_noise.source_footprints(img, jnp.full((n, n), 10.0), jnp.ones((n, n), bool), sigma, half=10))
    assert fp_high.sum() >= 0.9 * fp_true.sum()


def test_footprints_jit_vmap_and_blocks():
    """Static shapes: jit and vmap over images and PSF widths; large images work on blocks (b = 2 at 1024²)."""
    rng = np.random.default_rng(5)
    imgs = jnp.asarray(rng.normal(0, 1, (2, 96, 96)))
    imgs = imgs.at[:, 40:44, 40:44].add(200.0)
    fn = jax.jit(jax.vmap(lambda im, s: _noise.source_footprints(im, jnp.ones_like(im), im > -99, s, half=8)))
    out = np.asarray(fn(imgs, jnp.array([1.5, 2.5])))
    assert out.shape == (2, 96, 96) and out[:, 42, 42].all() and out[1].sum() > out[0].sum()
    assert _noise.block_size((1024, 1024)) == 2 and _noise.block_size((512, 512)) == 1
    big = rng.normal(0, 1, (1024, 1024))
    big[500:504, 300:304] += 200.0
    fp = np.asarray(
        _noise.source_footprints(jnp.asarray(big), jnp.ones((1024, 1024)), jnp.ones((1024, 1024), bool), 2.0, half=8)
    )
    assert fp.shape == (1024, 1024) and fp[502, 302] and fp.mean() < 0.01


@pytest.mark.parametrize(("shape", "b"), [((37, 53), 5), ((64, 64), 4), ((9, 8), 1), ((30, 31), 8)])
def test_block_sums_equal_numpy(shape, b):
    """The one-pass block sums of several planes equal numpy's sums over zero-padded b × b blocks."""
    rng = np.random.default_rng(b)
    planes = [rng.normal(size=shape).astype(np.float32), (rng.random(shape) > 0.3).astype(np.float32)]
    got = _noise._block_sums(tuple(jnp.asarray(p) for p in planes), b)
    nby, nbx = -(-shape[0] // b), -(-shape[1] // b)
    for p, g in zip(planes, got, strict=True):
        padded = np.zeros((nby * b, nbx * b), np.float64)
        padded[: shape[0], : shape[1]] = p
        want = padded.reshape(nby, b, nbx, b).sum(axis=(1, 3))
        assert g.shape == (nby, nbx)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


def test_kernel_sources_are_excluded():
    """A kernel source too faint to be detected still gets a footprint of radius ⌈2.4 σ⌉."""
    n = 64
    img = jnp.asarray(np.random.default_rng(6).normal(0, 1, (n, n)))
    xy = (jnp.array([20.0, 50.0]), jnp.array([30.0, 10.0]), jnp.array([True, False]))
    fp = np.asarray(_noise.source_footprints(img, jnp.ones((n, n)), jnp.ones((n, n), bool), 2.0, xy, half=8))
    assert fp[30, 20] and fp[30 + 5, 20 - 5] and not fp[30 + 7, 20]
    assert not fp[10, 50]  # invalid source


def test_smoothing_equals_the_shifted_sum():
    """The footprint smoothing (one FFT of the stacked planes) is the separable sum of shifted copies, zero
    outside the array, for each plane with its own kernel."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2, 37, 52))
    a[0, 3, 50] = 40.0  # a bright pixel at the edge: no wrap-around
    offsets = np.arange(-4, 5)
    g = np.stack([np.exp(-0.5 * (offsets / s) ** 2) for s in (1.3, 2.2)])
    got = np.asarray(_noise._smooth(jnp.asarray(a), jnp.asarray(g)))
    for plane, kernel, out in zip(a, g, got, strict=True):
        p = np.pad(plane, 4)
        rows = sum(kernel[j] * p[:, j : j + 52] for j in range(9))
        want = sum(kernel[j] * rows[j : j + 37, :] for j in range(9))
        np.testing.assert_allclose(out, want, atol=1e-10)
