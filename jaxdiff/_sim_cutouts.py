"""Simulated alert-sized cut-out pairs: aligned science/template stamps with a transient at the centre.

Survey alerts carry aligned 63 × 63 science, template and difference stamps centred on the detection. This
draws many such pairs at once (vectorised numpy, seeded) and returns them stacked along a leading axis, ready
for `jax.vmap` / `jd.batch.subtract_batch`.
"""

import dataclasses

import numpy as np

from ._exposure import Exposure
from ._mask import DEFAULT_PLANES
from ._psf import GaussianPsf
from ._sources import Sources


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedCutouts:
    """Stacked cut-out pairs and what went into them (numpy arrays of length n).

    Attributes:
        templates, sciences: `Exposure`s with a leading axis n (GaussianPsf widths per pair, no WCS).
        sources: an all-padding `Sources` of length 1 per pair (cut-outs have no star list).
        transient_x, transient_y: the transient's position in array coordinates (the stamp centre).
        transient_flux: its flux in science units.
        template_sigma, science_sigma: the PSF widths (pixels).
        flux_scale: science flux / template flux of the static scene (the true kernel sum).
        stars_x, stars_y, stars_flux: the stars (n, n_stars), array coordinates, template flux.
        host_x, host_y, host_flux: the host galaxy, array coordinates, template flux.
    """

    templates: Exposure
    sciences: Exposure
    sources: Sources
    transient_x: np.ndarray
    transient_y: np.ndarray
    transient_flux: np.ndarray
    template_sigma: np.ndarray
    science_sigma: np.ndarray
    flux_scale: np.ndarray
    stars_x: np.ndarray
    stars_y: np.ndarray
    stars_flux: np.ndarray
    host_x: np.ndarray
    host_y: np.ndarray
    host_flux: np.ndarray


def _gaussians(size: int, x, y, sigma, flux):
    """Σ_j flux_j · N(x_j, y_j, σ) sampled at pixel centres for each pair: x, y, flux (n, m), sigma (n, 1)."""
    grid = np.arange(size, dtype=np.float64)
    gx = np.exp(-0.5 * ((grid[None, None, :] - x[..., None]) / sigma[..., None]) ** 2)
    gy = np.exp(-0.5 * ((grid[None, None, :] - y[..., None]) / sigma[..., None]) ** 2)
    norm = flux / (2 * np.pi * sigma**2)
    return np.einsum("nm,nmy,nmx->nyx", norm, gy, gx)


def simulate_cutouts(
    n: int,
    size: int = 63,
    *,
    seed: int = 0,
    template_sigma: tuple[float, float] = (1.3, 1.7),
    science_sigma: tuple[float, float] = (1.9, 2.5),
    transient_flux: tuple[float, float] = (1.5e4, 3e4),
    n_stars: int = 3,
    star_flux: tuple[float, float] = (1e3, 1e5),
    host_flux: tuple[float, float] = (0.0, 3e4),
    host_sigma: float = 3.5,
    flux_scale: tuple[float, float] = (0.8, 1.2),
    sky_template: float = 200.0,
    sky_science: float = 300.0,
    read_noise: float = 5.0,
    psf_size: int = 21,
    dtype=np.float32,
) -> SimulatedCutouts:
    """n aligned template/science cut-outs with stars, a host galaxy and a transient at the centre.

    Every pair draws its own PSF widths, stars (positions uniform over the stamp, log-uniform fluxes), a host
    (a Gaussian of width `host_sigma` before the PSF, 2–5 px from the centre), a flux scale and the
    transient (science only, at the central pixel). Noise is Gaussian with the expected variance
    (sky + sources + read_noise², gain 1), which is also the variance plane. DETECTED marks pixels whose
    sources exceed 5√variance (as `simulate_pair`).

    Arguments:
        n: number of pairs.
        size: stamp side (pixels).
        seed: seed of every random draw.
        template_sigma, science_sigma: ranges of the Gaussian PSF widths (pixels), drawn uniformly.
        transient_flux: range of the transient flux (science units), uniform.
        n_stars: stars per stamp.
        star_flux: range of star fluxes (template units), log-uniform.
        host_flux: range of the host flux (template units), uniform.
        host_sigma: intrinsic host width (pixels).
        flux_scale: range of science / template flux of the static scene.
        sky_template, sky_science: sky levels (counts per pixel).
        read_noise: read noise (counts).
        psf_size: side of the PSF images (odd).
        dtype: image and variance dtype.

    Returns:
        A `SimulatedCutouts`.
    """
    rng = np.random.default_rng(seed)
    c = (size - 1) // 2
    sig_t = rng.uniform(*template_sigma, size=(n, 1))
    sig_s = rng.uniform(*science_sigma, size=(n, 1))
    scale = rng.uniform(*flux_scale, size=(n, 1))
    sx = rng.uniform(0, size - 1, size=(n, n_stars))
    sy = rng.uniform(0, size - 1, size=(n, n_stars))
    sf = np.exp(rng.uniform(np.log(star_flux[0]), np.log(star_flux[1]), size=(n, n_stars)))
    r = rng.uniform(2.0, 5.0, size=(n, 1))
    phi = rng.uniform(0, 2 * np.pi, size=(n, 1))
    hx, hy = c + r * np.cos(phi), c + r * np.sin(phi)
    hf = rng.uniform(*host_flux, size=(n, 1))
    tf = rng.uniform(*transient_flux, size=n)

    def scene(sigma, scale_):
        stars = _gaussians(size, sx, sy, sigma, scale_ * sf)
        host = _gaussians(size, hx, hy, np.sqrt(sigma**2 + host_sigma**2), scale_ * hf)
        return stars + host

    t_sources = scene(sig_t, 1.0)
    s_sources = scene(sig_s, scale) + _gaussians(
        size, np.full((n, 1), float(c)), np.full((n, 1), float(c)), sig_s, tf[:, None]
    )
    t_var = sky_template + t_sources + read_noise**2
    s_var = sky_science + s_sources + read_noise**2
    t_img = sky_template + t_sources + np.sqrt(t_var) * rng.standard_normal(t_var.shape)
    s_img = sky_science + s_sources + np.sqrt(s_var) * rng.standard_normal(s_var.shape)
    detected = 1 << dict(DEFAULT_PLANES)["DETECTED"]
    xy0 = np.zeros((n, 2), np.int32)
    templates = Exposure(
        t_img.astype(dtype),
        t_var.astype(dtype),
        np.where(t_sources > 5 * np.sqrt(t_var), detected, 0).astype(np.int32),
        psf=GaussianPsf(sig_t[:, 0].astype(dtype), psf_size),
        xy0=xy0,
        photo_calib=np.ones(n, dtype),
        mask_planes=DEFAULT_PLANES,
    )
    sciences = Exposure(
        s_img.astype(dtype),
        s_var.astype(dtype),
        np.where(s_sources > 5 * np.sqrt(s_var), detected, 0).astype(np.int32),
        psf=GaussianPsf(sig_s[:, 0].astype(dtype), psf_size),
        xy0=xy0,
        photo_calib=(1.0 / scale[:, 0]).astype(dtype),
        mask_planes=DEFAULT_PLANES,
    )
    sources = Sources(np.zeros((n, 1)), np.zeros((n, 1)), valid=np.zeros((n, 1), bool))
    return SimulatedCutouts(
        templates,
        sciences,
        sources,
        np.full(n, float(c)),
        np.full(n, float(c)),
        tf,
        sig_t[:, 0],
        sig_s[:, 0],
        scale[:, 0],
        sx,
        sy,
        sf,
        hx[:, 0],
        hy[:, 0],
        hf[:, 0],
    )
