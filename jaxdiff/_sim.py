"""Simulated image pairs with known PSFs, sky, noise and transients.

Everything is drawn on the host with seeded numpy generators (same seed, bit-identical arrays) and
returned as jaxdiff objects. `simulate_pair` makes realistic pairs (Poisson sky and stars, read noise,
spatially varying Gaussian or Moffat PSFs, transients); `reference_pair` is the reference simulation
of ALGORITHM §15 used by the correctness tests.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from . import spatial
from ._exposure import Exposure
from ._mask import DEFAULT_PLANES, plane_bit
from ._psf import FWHM_PER_SIGMA, GaussianPsf, GridPsf, ImagePsf, Psf
from ._sources import Sources

_MARGIN = 20  # star and transient centres stay this many pixels inside the science box
_GRID_NODES = 5  # nodes per axis of the GridPsf describing a varying PSF
_REF_STAMP = 31  # ALGORITHM §15: stars drawn on 31 × 31 stamps, PSF GaussianPsf(σ, 31)
_REF_BUFFER = 16  # ALGORITHM §15: buf = 16 + border
_REF_EDGE_PER_SIGMA = 3.5  # EDGE border round(3.5σ): 7, 8, 10 px for σ = 2.0, 2.4, 2.8


@dataclasses.dataclass(frozen=True, eq=False)
class Truth:
    """What went into a simulated pair (plain numpy values, parent pixel coordinates).

    Arguments:
        transients_x, transients_y, transients_flux: transients (science only), science flux units.
        stars_x, stars_y, stars_flux: stars at their template positions (the science has them at
            position + `shift`), template flux units.
        flux_scale: science flux = flux_scale × template flux (the true kernel sum).
        background_science, background_template: the sky planes added, shaped like the images.
        psf_science, psf_template: the PSFs used for rendering (also on the exposures).
        shift: sub-pixel shift (dx, dy) applied to the science's stars.
        noiseless_science, noiseless_template: the images before noise (sky included).
    """

    transients_x: np.ndarray
    transients_y: np.ndarray
    transients_flux: np.ndarray
    stars_x: np.ndarray
    stars_y: np.ndarray
    stars_flux: np.ndarray
    flux_scale: float
    background_science: np.ndarray
    background_template: np.ndarray
    psf_science: Psf
    psf_template: Psf
    shift: tuple[float, float]
    noiseless_science: np.ndarray
    noiseless_template: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedPair:
    """A template and science exposure, the kernel-candidate stars and the truth behind them."""

    template: Exposure
    science: Exposure
    sources: Sources
    truth: Truth


@dataclasses.dataclass(frozen=True)
class _PsfModel:
    """The rendering PSF of one image: profile, width and their linear change over the field.

    Width σ(x, y) = sigma·(1 + sigma_variation·(x' + y')/2) and ellipticity
    (e1, e2) = ellipticity_variation·(x', y')/√2, with (x', y') the science box mapped to [-1, 1]
    (`spatial.normalise`). The profile of radius² r² = dᵀ A⁻¹ d, A = [[1+e1, e2], [e2, 1−e1]]/√(1−e²)
    (unit determinant, so σ stays the geometric-mean width), is exp(−r²/2σ²) for "gaussian" and
    (1 + r²/α²)^−β for "moffat", α chosen so both have FWHM 2√(2 ln 2)·σ.
    """

    profile: str
    sigma: float
    sigma_variation: float
    ellipticity_variation: float
    beta: float
    field: tuple[float, float, float, float]

    @property
    def constant(self) -> bool:
        return self.sigma_variation == 0 and self.ellipticity_variation == 0

    def params(self, x, y):
        """Width σ and ellipticity (e1, e2) at parent positions (x, y)."""
        xn, yn = spatial.normalise(np.asarray(x, np.float64), np.asarray(y, np.float64), np.array(self.field))
        sigma = self.sigma * (1 + self.sigma_variation * 0.5 * (xn + yn))
        e1 = self.ellipticity_variation * xn / math.sqrt(2)
        e2 = self.ellipticity_variation * yn / math.sqrt(2)
        return sigma, e1, e2

    def images(self, x, y, dx, dy, size: int) -> np.ndarray:
        """Unit-sum (n, size, size) images at pixel centres, profile centred at (h + dx, h + dy).

        Arguments:
            x, y: parent positions (n,) at which the width and ellipticity are evaluated.
            dx, dy: sub-pixel offsets (n,) of the profile centre from the stamp's central pixel.
            size: stamp side (odd).
        """
        sigma, e1, e2 = self.params(x, y)
        off = np.arange(size, dtype=np.float64) - (size - 1) / 2
        u = off[None, None, :] - np.asarray(dx, np.float64)[:, None, None]
        v = off[None, :, None] - np.asarray(dy, np.float64)[:, None, None]
        e1, e2, sigma = e1[:, None, None], e2[:, None, None], sigma[:, None, None]
        r2 = (u * u * (1 - e1) - 2 * e2 * u * v + v * v * (1 + e1)) / np.sqrt(1 - e1**2 - e2**2)
        if self.profile == "gaussian":
            img = np.exp(-0.5 * r2 / sigma**2)
        else:
            alpha = sigma * FWHM_PER_SIGMA / (2 * math.sqrt(2 ** (1 / self.beta) - 1))
            img = (1 + r2 / alpha**2) ** -self.beta
        return img / img.sum(axis=(1, 2), keepdims=True)

    def psf(self, bbox: tuple[int, int, int, int], size: int, dtype) -> Psf:
        """The jaxdiff PSF of an image with inclusive bbox (x_min, y_min, x_max, y_max)."""
        if self.constant and self.profile == "gaussian":
            return GaussianPsf(jnp.asarray(np.asarray(self.sigma, dtype)), size)
        if self.constant:
            zero = np.zeros(1)
            return ImagePsf(self.images(zero, zero, zero, zero, size)[0].astype(dtype))
        xs = np.linspace(bbox[0], bbox[2], _GRID_NODES)
        ys = np.linspace(bbox[1], bbox[3], _GRID_NODES)
        gx, gy = np.meshgrid(xs, ys)
        zero = np.zeros(gx.size)
        nodes = self.images(gx.ravel(), gy.ravel(), zero, zero, size)
        return GridPsf(nodes.reshape(_GRID_NODES, _GRID_NODES, size, size).astype(dtype), np.asarray(bbox, dtype))


def _render(out: np.ndarray, xy0, model: _PsfModel, x, y, flux, size: int) -> np.ndarray:
    """Add point sources to `out` in place: flux × unit-sum stamp on the nearest pixel, clipped to the array.

    Arguments:
        out: float64 image (ny, nx) whose pixel [0, 0] sits at parent `xy0`.
        x, y, flux: parent positions and fluxes (n,).
        size: stamp side (odd).

    Returns:
        `out`.
    """
    ny, nx = out.shape
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ix = np.floor(x + 0.5)
    iy = np.floor(y + 0.5)
    stamps = model.images(x, y, x - ix, y - iy, size) * np.asarray(flux, np.float64)[:, None, None]
    off = np.arange(size) - (size - 1) // 2
    cols = (ix.astype(np.int64) - xy0[0])[:, None, None] + off[None, None, :]
    rows = (iy.astype(np.int64) - xy0[1])[:, None, None] + off[None, :, None]
    rows, cols = np.broadcast_arrays(rows, cols)
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    np.add.at(out.reshape(-1), rows[inside] * nx + cols[inside], stamps[inside])
    return out


def _parent_grid(shape, xy0):
    ny, nx = shape
    return np.arange(nx, dtype=np.float64)[None, :] + xy0[0], np.arange(ny, dtype=np.float64)[:, None] + xy0[1]


def _sky(shape, xy0, level: float, gradient: float, field) -> np.ndarray:
    """level × (1 + gradient·(x' + y')/2): a plane going ±gradient over the field's corners."""
    xs, ys = _parent_grid(shape, xy0)
    xn, yn = spatial.normalise(xs, ys, np.asarray(field, np.float64))
    return (level * (1 + 0.5 * gradient * xn)) + (0.5 * level * gradient * yn)


def _power_law(rng, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """n draws from dN/dF ∝ F^slope on [lo, hi] by inverting the cumulative distribution."""
    u = rng.uniform(size=n)
    if slope == -1:
        return lo * (hi / lo) ** u
    p = slope + 1
    return (lo**p + u * (hi**p - lo**p)) ** (1 / p)


def _noisy(rng, expected, gain: float, read_noise: float):
    """Poisson noise in electrons (ADU × gain) plus Gaussian read noise (ADU); returns (image, variance)."""
    image = rng.poisson(expected * gain) / gain
    image += read_noise * rng.standard_normal(expected.shape, dtype=np.float32)
    return image, expected / gain + read_noise**2


def _bbox(shape, xy0) -> tuple[int, int, int, int]:
    return xy0[0], xy0[1], xy0[0] + shape[1] - 1, xy0[1] + shape[0] - 1


def _default_psf_size(models, corners) -> int:
    sigma_max = max(float(np.max(m.params(*corners)[0])) for m in models)
    return max(21, 2 * math.ceil(4 * sigma_max) + 1)


def _check_fields(models, corners, sky_gradient: float) -> None:
    for m in models:
        sigma, e1, e2 = m.params(*corners)
        if np.min(sigma) <= 0:
            raise ValueError(
                f"sigma_variation={m.sigma_variation} makes the PSF width {np.min(sigma):.3g} px at a "
                "corner; use |sigma_variation| < 1"
            )
        if np.max(e1**2 + e2**2) >= 0.81:
            raise ValueError(
                f"ellipticity_variation={m.ellipticity_variation} gives ellipticity ≥ 0.9 at a corner; "
                "use a smaller one"
            )
    if not 0 <= sky_gradient < 1:
        raise ValueError(f"sky_gradient must be in [0, 1) so that the sky stays positive, got {sky_gradient}")


def _detected(table, sources: np.ndarray, threshold_squared) -> np.ndarray:
    """DETECTED where the (non-negative) noiseless sources exceed a threshold given squared."""
    return (sources * sources > threshold_squared).astype(np.int32) << plane_bit(table, "DETECTED")


def simulate_pair(
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int = 0,
    n_stars: int = 300,
    flux_range: tuple[float, float] = (500.0, 2e5),
    flux_slope: float = -1.5,
    psf_model: str = "gaussian",
    template_sigma: float = 2.0,
    science_sigma: float = 2.4,
    sigma_variation: float = 0.0,
    ellipticity_variation: float = 0.0,
    moffat_beta: float = 3.0,
    sky_template: float = 200.0,
    sky_science: float = 300.0,
    sky_gradient: float = 0.1,
    gain: float = 1.0,
    read_noise: float = 5.0,
    flux_scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    n_transients: int = 0,
    transient_flux_range: tuple[float, float] = (2e3, 2e4),
    no_data_regions: tuple[tuple[int, int, int, int], ...] = (),
    template_border: int = 0,
    xy0: tuple[int, int] = (0, 0),
    dtype=np.float32,
    psf_size: int | None = None,
) -> SimulatedPair:
    """A realistic template/science pair of one star field with sky, Poisson and read noise.

    Stars (and transients) are drawn by evaluating the PSF profile at pixel centres on a `psf_size`
    stamp at their sub-pixel positions, normalised to unit sum (the PSF images are the same profile,
    centred). Seeded streams for the scene, transients and each image's noise are independent, so
    e.g. adding transients changes nothing else.

    Arguments:
        shape: science (ny, nx); the template is (ny + 2b, nx + 2b) at xy0 − b, b = `template_border`.
        seed: seed of every random draw.
        n_stars: number of stars, centres uniform at least 20 px inside the science box.
        flux_range, flux_slope: template star fluxes (counts) follow dN/dF ∝ F^flux_slope on the range.
        psf_model: "gaussian" or "moffat" (β = `moffat_beta`, FWHM equal to the Gaussian's of that σ).
        template_sigma, science_sigma: PSF widths σ at the field centre (pixels).
        sigma_variation: width goes linearly from σ(1 − v) at the science box's lower-left corner to
            σ(1 + v) at the upper-right one.
        ellipticity_variation: ellipticity (e1, e2) = v·(x', y')/√2, (x', y') ∈ [-1, 1] over the science box.
        sky_template, sky_science: sky levels (counts per pixel) at the field centre.
        sky_gradient: each sky is level × (1 + g·(x' + y')/2), i.e. ±g at the corners; 0 ≤ g < 1.
        gain: electrons per count; Poisson noise is drawn in electrons.
        read_noise: Gaussian read noise (counts).
        flux_scale: science star fluxes = flux_scale × template fluxes (the true kernel sum).
        shift: (dx, dy) sub-pixel offset of the science's stars from the template's.
        n_transients: point sources in the science only, fluxes uniform in `transient_flux_range`.
        no_data_regions: (x0, y0, x1, y1) half-open boxes in science array coordinates flagged NO_DATA
            in the template, whose image is set to 0 there (variance left as simulated).
        template_border: extra template pixels on each side (≥ 0).
        xy0: parent (x0, y0) of the science's pixel [0, 0].
        dtype: image and variance dtype.
        psf_size: PSF and star stamp side (odd); default max(21, 2⌈4σ_max⌉ + 1).

    Returns:
        A `SimulatedPair`. Variance planes are the model expectation (sky + sources)/gain + read_noise².
        DETECTED marks pixels whose sources (without sky) exceed 5√variance. PSFs: `GaussianPsf` for a
        constant Gaussian, `ImagePsf` for a constant Moffat, else a 5 × 5 `GridPsf` over each image's box.
        `sources` holds the stars at their science positions with their template fluxes.
    """
    if psf_model not in ("gaussian", "moffat"):
        raise ValueError(f"psf_model={psf_model!r} is not allowed; use 'gaussian' or 'moffat'")
    ny, nx = shape
    if min(ny, nx) <= 2 * _MARGIN:
        raise ValueError(f"shape={shape} is too small; both sides must exceed {2 * _MARGIN} px")
    if template_border < 0:
        raise ValueError(f"template_border must be >= 0, got {template_border}")
    if psf_size is not None and (psf_size % 2 == 0 or psf_size < 3):
        raise ValueError(f"psf_size must be odd and >= 3, got {psf_size}")
    b = int(template_border)
    xy0 = (int(xy0[0]), int(xy0[1]))
    t_xy0 = (xy0[0] - b, xy0[1] - b)
    t_shape = (ny + 2 * b, nx + 2 * b)
    field = (float(xy0[0]), float(xy0[1]), float(nx), float(ny))
    models = [
        _PsfModel(
            psf_model,
            float(s),
            float(sigma_variation),
            float(ellipticity_variation),
            float(moffat_beta),
            field,
        )
        for s in (template_sigma, science_sigma)
    ]
    t_box = _bbox(t_shape, t_xy0)
    corners = (
        np.array([t_box[0], t_box[2], t_box[0], t_box[2]]),
        np.array([t_box[1], t_box[1], t_box[3], t_box[3]]),
    )
    _check_fields(models, corners, sky_gradient)
    size = _default_psf_size(models, corners) if psf_size is None else int(psf_size)
    scene_rng, transient_rng, t_noise_rng, s_noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )

    def positions(rng, n):
        x = xy0[0] + _MARGIN + rng.uniform(size=n) * (nx - 1 - 2 * _MARGIN)
        y = xy0[1] + _MARGIN + rng.uniform(size=n) * (ny - 1 - 2 * _MARGIN)
        return x, y

    sx, sy = positions(scene_rng, n_stars)
    sf = _power_law(scene_rng, n_stars, float(flux_range[0]), float(flux_range[1]), float(flux_slope))
    tx, ty = positions(transient_rng, n_transients)
    tf = transient_rng.uniform(transient_flux_range[0], transient_flux_range[1], size=n_transients)
    dx, dy = float(shift[0]), float(shift[1])

    t_sources = _render(np.zeros(t_shape), t_xy0, models[0], sx, sy, sf, size)
    s_sources = _render(np.zeros(shape), xy0, models[1], sx + dx, sy + dy, flux_scale * sf, size)
    _render(s_sources, xy0, models[1], tx, ty, tf, size)
    t_sky = _sky(t_shape, t_xy0, sky_template, sky_gradient, field)
    s_sky = _sky(shape, xy0, sky_science, sky_gradient, field)
    t_noiseless = t_sky + t_sources
    s_noiseless = s_sky + s_sources
    t_image, t_var = _noisy(t_noise_rng, t_noiseless, gain, read_noise)
    s_image, s_var = _noisy(s_noise_rng, s_noiseless, gain, read_noise)

    table = DEFAULT_PLANES
    t_mask = _detected(table, t_sources, 25 * t_var)
    s_mask = _detected(table, s_sources, 25 * s_var)
    no_data = 1 << plane_bit(table, "NO_DATA")
    for x0, y0, x1, y1 in no_data_regions:
        region = (slice(max(y0 + b, 0), max(y1 + b, 0)), slice(max(x0 + b, 0), max(x1 + b, 0)))
        t_mask[region] |= no_data
        t_image[region] = 0.0

    psf_t = models[0].psf(t_box, size, dtype)
    psf_s = models[1].psf(_bbox(shape, xy0), size, dtype)
    template = Exposure(t_image.astype(dtype), t_var.astype(dtype), t_mask, psf_t, t_xy0, mask_planes=table)
    science = Exposure(
        s_image.astype(dtype),
        s_var.astype(dtype),
        s_mask,
        psf_s,
        xy0,
        photo_calib=1.0 / flux_scale,
        mask_planes=table,
    )
    truth = Truth(
        transients_x=tx,
        transients_y=ty,
        transients_flux=tf,
        stars_x=sx,
        stars_y=sy,
        stars_flux=sf,
        flux_scale=float(flux_scale),
        background_science=s_sky,
        background_template=t_sky,
        psf_science=psf_s,
        psf_template=psf_t,
        shift=(dx, dy),
        noiseless_science=s_noiseless,
        noiseless_template=t_noiseless,
    )
    return SimulatedPair(template, science, Sources(sx + dx, sy + dy, sf), truth)


def reference_pair(
    shape: tuple[int, int] = (256, 256),
    *,
    xy0: tuple[int, int] = (12345, 67890),
    n_stars: int = 20,
    science_sigma: float = 2.4,
    template_sigma: float = 2.0,
    science_noise: float = 1.0,
    template_noise: float = 1.0,
    template_border: int = 0,
    seed: int = 0,
    noise_seed: int | None = None,
    add_edge: bool = False,
    add_detected: bool = True,
    background=None,
    flux_range: tuple[float, float] = (500, 1000),
    dtype=np.float64,
) -> SimulatedPair:
    """The reference simulation of ALGORITHM §15 (after LSST ip_diffim's `makeTestImage`).

    Star positions, per axis uniform in [buf, W − buf) of the template box with buf = 16 + border (so
    16 px inside the science box whatever the border), and fluxes uniform in `flux_range`, drawn from
    `seed`, are shared by both images. A star is flux × a unit-sum Gaussian sampled at pixel centres on
    31 × 31 at its sub-pixel position; no sky, no Poisson noise. Each image gets N(0, n²) noise from
    its own stream of `noise_seed`, mean removed; variance = √|stars| + n².

    Arguments:
        shape: science (ny, nx).
        xy0: parent (x0, y0) of the science; the template starts at xy0 − template_border.
        n_stars: number of stars.
        science_sigma, template_sigma: Gaussian PSF widths (pixels).
        science_noise, template_noise: noise standard deviations n.
        template_border: extra template pixels b on each side; the template is (ny + 2b, nx + 2b).
        seed: seed of the star positions and fluxes.
        noise_seed: seed of the two noise streams (default: `seed`; the streams differ from the stars').
        add_edge: flag EDGE on a border of round(3.5σ) px (7, 8, 10 for σ 2.0, 2.4, 2.8) of each image.
        add_detected: flag DETECTED where the noiseless stars exceed 5n.
        background: optional 6 Chebyshev order-2 coefficients (`spatial.terms` order) of a background
            added to the science over its box (not part of its variance).
        flux_range: star fluxes (low, high).
        dtype: image and variance dtype.

    Returns:
        A `SimulatedPair` with PSFs `GaussianPsf(σ, 31)` and sources at the true positions and fluxes.
    """
    ny, nx = shape
    b = int(template_border)
    xy0 = (int(xy0[0]), int(xy0[1]))
    t_xy0 = (xy0[0] - b, xy0[1] - b)
    t_shape = (ny + 2 * b, nx + 2 * b)
    buf = _REF_BUFFER + b
    if min(t_shape) <= 2 * buf:
        raise ValueError(f"shape={shape} is too small for the {_REF_BUFFER}-px star buffer")
    rng = np.random.default_rng(seed)
    x = t_xy0[0] + buf + rng.uniform(size=n_stars) * (t_shape[1] - 2 * buf)
    y = t_xy0[1] + buf + rng.uniform(size=n_stars) * (t_shape[0] - 2 * buf)
    flux = rng.uniform(flux_range[0], flux_range[1], size=n_stars)
    noise_rngs = [
        np.random.default_rng(s) for s in np.random.SeedSequence(seed if noise_seed is None else noise_seed).spawn(2)
    ]
    field = (float(xy0[0]), float(xy0[1]), float(nx), float(ny))
    table = DEFAULT_PLANES
    edge = 1 << plane_bit(table, "EDGE")

    def image(shape_, xy0_, sigma, noise, rng):
        model = _PsfModel("gaussian", float(sigma), 0.0, 0.0, 0.0, field)
        stars = _render(np.zeros(shape_), xy0_, model, x, y, flux, _REF_STAMP)
        deviate = noise * rng.standard_normal(shape_)
        deviate -= deviate.mean()
        variance = np.sqrt(np.abs(stars)) + noise**2
        mask = _detected(table, stars, (5 * noise) ** 2) if add_detected else np.zeros(shape_, np.int32)
        if add_edge:
            w = math.floor(_REF_EDGE_PER_SIGMA * sigma + 0.5)
            mask[:w] |= edge
            mask[-w:] |= edge
            mask[:, :w] |= edge
            mask[:, -w:] |= edge
        return stars, stars + deviate, variance, mask, model.psf(_bbox(shape_, xy0_), _REF_STAMP, dtype)

    s_stars, s_image, s_var, s_mask, psf_s = image(shape, xy0, science_sigma, science_noise, noise_rngs[0])
    t_stars, t_image, t_var, t_mask, psf_t = image(t_shape, t_xy0, template_sigma, template_noise, noise_rngs[1])
    s_background = np.zeros(shape)
    if background is not None:
        coeffs = np.asarray(background, np.float64)
        if coeffs.shape != (spatial.n_terms(2),):
            raise ValueError(f"background must hold 6 Chebyshev order-2 coefficients, got shape {coeffs.shape}")
        xs, ys = _parent_grid(shape, xy0)
        xs, ys = np.broadcast_arrays(xs, ys)
        terms = np.asarray(spatial.terms(xs, ys, np.array(field), 2), np.float64)
        s_background = np.tensordot(coeffs, terms, axes=1)
        s_image = s_image + s_background

    template = Exposure(t_image.astype(dtype), t_var.astype(dtype), t_mask, psf_t, t_xy0, mask_planes=table)
    science = Exposure(s_image.astype(dtype), s_var.astype(dtype), s_mask, psf_s, xy0, mask_planes=table)
    empty = np.zeros(0)
    truth = Truth(
        transients_x=empty,
        transients_y=empty,
        transients_flux=empty,
        stars_x=x,
        stars_y=y,
        stars_flux=flux,
        flux_scale=1.0,
        background_science=s_background,
        background_template=np.zeros(t_shape),
        psf_science=psf_s,
        psf_template=psf_t,
        shift=(0.0, 0.0),
        noiseless_science=s_stars + s_background,
        noiseless_template=t_stars,
    )
    return SimulatedPair(template, science, Sources(x, y, flux), truth)
