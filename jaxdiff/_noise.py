"""Source exclusion for the noise estimates: variance factors (ALGORITHM §4.1) and svar/tvar (§11) without masks.

LSST estimates the variance factors and the decorrelation's variance levels on pixels outside its grown
DETECTED footprints. Most inputs (plain FITS, simulations, other surveys) carry no DETECTED plane, and then
star wings inflate the estimates (×1.09 on the demo pair, ×4.1 on a bright field). So jaxdiff builds its own
source footprints on every image, whatever its masks say, the way LSST's `SourceDetectionTask` builds
DETECTED:

1. Work on blocks of b × b pixels (b = the stride of `variance_factor`'s regular subsample: 1 up to 512²,
   2 at 1024², 4 at 2048², 8 at 4096²), so the cost stays that of a ≤ 2¹⁸-pixel image: block means and
   the variance of each mean.
2. Subtract a median background (32 × 32 blocks, bilinear between bin centres; `median_background`).
3. Smooth with the PSF's Gaussian-equivalent width σ (a unit-sum Gaussian: the matched filter of a Gaussian
   PSF) and divide by the smoothed noise √(Σ g² V): the S/N image.
4. Detect |S/N| > `THRESHOLD` = 5 (LSST's `thresholdValue`, and its negative footprints: DETECTED_NEGATIVE).
   When the S/N image's own robust scale 0.7413·IQR is below 1 (a variance plane larger than the pixel
   noise), the threshold is lowered by that scale, so an overestimated variance does not hide the wings.
5. Add the blocks holding the given kernel sources.
6. Grow every footprint by ⌈`GROW` · σ⌉ pixels, `GROW` = 2.4 (LSST's `nSigmaToGrow`), as a square of that
   half-side (it contains LSST's circular growth).

Smoothing at the PSF scale reaches far into the wings: for a Gaussian PSF the smoothed profile has width
σ√2 and the smoothed noise is σ_n / (2√π σ), so the footprint of a star of flux F ends where
F exp(−r²/4σ²) / (4πσ²) = 5 σ_n / (2√π σ) — for F = 30 000, σ = 3.3, σ_n = 0.2 at r = 18.5 px, where the star
adds 10⁻⁷ σ_n per pixel. If fewer than `MIN_FREE_FRACTION` of the usable pixels remain outside the footprints
(a field covered by one galaxy), the exclusion is dropped rather than estimating from a handful of pixels; the
pixels are counted on the grid of every b-th row and column, the one `variance_factor` reads.

The footprints stay per block (`SourceFree`): the estimates read the images on that grid or on fewer samples,
so a pixel-sized footprint image would only be written to be subsampled (at 4096² that cost 1.3 s of op time).

Everything here is a selection: it runs under `stop_gradient`, has static shapes for given image and PSF
sizes, and is jit/vmap-friendly (the PSF width may be traced).
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from ._mask import bitmask
from ._stats import _IQR_TO_SIGMA, grid_stride, median_background, quantile_masked, usable
from ._types import Bool, Image
from .convolve import next_fast_len

THRESHOLD = 5.0  # detection threshold on the PSF-smoothed S/N image (LSST thresholdValue)
GROW = 2.4  # footprint growth in units of the PSF σ (LSST nSigmaToGrow)
DEFAULT_SIGMA = 2.0  # PSF σ (pixels) assumed for an image without a PSF
MIN_FREE_FRACTION = 0.01  # below this fraction of usable pixels outside the footprints, exclude nothing
MAX_PIXELS = 2**18  # block size b = ⌈√(n_pixels / MAX_PIXELS)⌉, as the stride of `variance_factor`
_BACKGROUND_BIN = 32
NOT_DATA = (
    "BAD",
    "SAT",
    "NO_DATA",
    "INTRP",
    "CR",
)  # mask planes whose pixels the detection does not read  # background bins, in blocks


def block_size(shape: tuple[int, int], max_pixels: int = MAX_PIXELS) -> int:
    """The block side b (static): `_stats.grid_stride`, the stride of `variance_factor`'s grid."""
    return grid_stride(shape, max_pixels)


def _block_sums(arrays, b: int) -> tuple:
    """Sums over b × b blocks of several (ny, nx) arrays of one dtype, zero-padded: each (⌈ny/b⌉, ⌈nx/b⌉).

    One variadic reduction per axis (within rows, then across them) reads all the arrays in one pass; a
    `jnp.sum` per array over the (⌈ny/b⌉, b, ⌈nx/b⌉, b) view took 31 ms for three 2048² planes, this 3 ms
    (99 → 11 ms at 4096²).
    """
    ny, nx = arrays[0].shape
    nby, nbx = -(-ny // b), -(-nx // b)
    arrays = tuple(jnp.pad(a, ((0, nby * b - ny), (0, nbx * b - nx))) for a in arrays)
    zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)

    def add(x, y):
        return tuple(u + v for u, v in zip(x, y, strict=True))

    rows = lax.reduce(tuple(a.reshape(nby * b, nbx, b) for a in arrays), zeros, add, (2,))
    return lax.reduce(tuple(r.reshape(nby, b, nbx) for r in rows), zeros, add, (1,))


def _smooth(a, g):
    """a (..., ny, nx) convolved along both axes with the symmetric 1-D kernels g (..., 2h + 1), zero outside
    the array ("same" output), through one FFT of the stacked inputs. A sum of 2h + 1 shifted copies per axis
    gave the same values but put hundreds of operations into the program (compile time)."""
    h = g.shape[-1] // 2
    ny, nx = a.shape[-2:]
    shape = (next_fast_len(ny + 2 * h), next_fast_len(nx + 2 * h))
    gy = jnp.fft.fft(g, shape[0])[..., :, None]
    gx = jnp.fft.rfft(g, shape[1])[..., None, :]
    out = jnp.fft.irfft2(jnp.fft.rfft2(a, shape) * gy * gx, shape)
    return out[..., h : h + ny, h : h + nx].astype(a.dtype)


def _grow(mask, radius):
    """Dilation of a boolean image by a square of half-side `radius` (traced integer ≥ 0), via prefix sums."""

    def along(m):  # axis 0
        n = m.shape[0]
        c = jnp.concatenate([jnp.zeros((1,) + m.shape[1:], jnp.int32), jnp.cumsum(m.astype(jnp.int32), axis=0)])
        i = jnp.arange(n)
        hi = jnp.clip(i + radius + 1, 0, n)
        lo = jnp.clip(i - radius, 0, n)
        return (c[hi] - c[lo]) > 0

    return along(along(mask).T).T


def source_footprints(
    image: Image,
    variance: Image,
    good: Bool,
    sigma,
    sources_xy=None,
    *,
    half: int,
    threshold: float = THRESHOLD,
    grow: float = GROW,
    max_pixels: int = MAX_PIXELS,
    blocks: bool = False,
) -> Bool:
    """Grown footprints of the sources on an image (see the module docstring).

    Arguments:
        image, variance: (ny, nx).
        good: boolean (ny, nx): pixels with data (further restricted to finite image and variance > 0).
        sigma: the PSF's Gaussian-equivalent width in pixels (scalar, may be traced; non-finite or ≤ 0 →
            `DEFAULT_SIGMA`).
        sources_xy: None, or (x, y, valid): kernel source positions in array pixels (column, row) and a
            validity flag; each valid one marks its pixel before the growth.
        half: static half-width of the smoothing kernel in pixels (≈ 4σ; e.g. the PSF image's half-side).
        threshold: |S/N| threshold of the smoothed image.
        grow: footprint growth in units of sigma.
        max_pixels: the work runs on b × b blocks, b = `block_size(image.shape, max_pixels)`.
        blocks: static; return the footprints on the blocks, (⌈ny/b⌉, ⌈nx/b⌉), rather than on the pixels.

    Returns:
        Boolean (ny, nx), or per block with `blocks`: True on source pixels.
    """
    image, variance, sigma = lax.stop_gradient((image, variance, sigma))
    ny, nx = image.shape
    b = block_size((ny, nx), max_pixels)
    dt = jnp.result_type(image.dtype, jnp.float32)
    sigma = jnp.asarray(sigma, dt)
    sigma = jnp.where(jnp.isfinite(sigma) & (sigma > 0), sigma, DEFAULT_SIGMA)
    ok = good & usable(image, variance)
    if b == 1:
        mean, var_mean, ok_b = jnp.where(ok, image, 0.0).astype(dt), jnp.where(ok, variance, 0.0).astype(dt), ok
    else:
        count, total, var_total = _block_sums(
            (ok.astype(dt), jnp.where(ok, image, 0.0).astype(dt), jnp.where(ok, variance, 0.0).astype(dt)), b
        )
        ok_b = count > 0
        safe = jnp.where(ok_b, count, 1.0)
        mean, var_mean = total / safe, var_total / safe**2
    bg = median_background(mean, ok_b, _BACKGROUND_BIN)
    resid = jnp.where(ok_b, mean - bg, 0.0)
    var_mean = jnp.where(ok_b, var_mean, 0.0)
    hb = max(1, -(-int(half) // b))
    offsets = jnp.arange(-hb, hb + 1, dtype=dt)
    g = jnp.exp(-0.5 * (offsets * b / sigma) ** 2)
    g = g / jnp.sum(g)
    num, den = _smooth(jnp.stack([resid, var_mean]), jnp.stack([g, g * g]))
    snr = jnp.where(ok_b & (den > 0), num / jnp.sqrt(jnp.where(den > 0, den, 1.0)), 0.0)
    q25, q75 = quantile_masked(snr, ok_b, jnp.array([0.25, 0.75]), max_samples=2**16)
    scale = jnp.where(jnp.isfinite(q75 - q25), _IQR_TO_SIGMA * (q75 - q25), 1.0)
    detected = ok_b & (jnp.abs(snr) > threshold * jnp.clip(scale, 0.2, 1.0))
    if sources_xy is not None:
        sx, sy, valid = sources_xy
        col = jnp.where(valid, jnp.floor(jnp.asarray(sx, dt) + 0.5), -1).astype(jnp.int32)
        row = jnp.where(valid, jnp.floor(jnp.asarray(sy, dt) + 0.5), -1).astype(jnp.int32)
        inside = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
        # out-of-range indices are dropped by the scatter
        col, row = jnp.where(inside, col // b, detected.shape[1]), jnp.where(inside, row // b, detected.shape[0])
        detected = detected.at[row, col].set(True, mode="drop")
    radius = jnp.ceil(grow * sigma / b).astype(jnp.int32)
    grown = _grow(detected, radius)
    return grown if blocks else _upsampled(grown, b, (ny, nx))


def _upsampled(blocks, b: int, shape):
    """A per-block boolean array on the pixels of `shape` (each block's value on its b × b pixels)."""
    if b == 1:
        return blocks
    return jnp.repeat(jnp.repeat(blocks, b, axis=0), b, axis=1)[: shape[0], : shape[1]]


class SourceFree(NamedTuple):
    """The source footprints of one image, as the noise estimates exclude them (`source_free`).

    Kept per block of b × b pixels (b = `block_size(shape)`): the estimates read the image on a grid of every
    b-th row and column (`variance_factor`) or on fewer samples (the variance levels), so no pixel-sized
    footprint image is ever needed.
    """

    blocks: Bool  # (⌈ny/b⌉, ⌈nx/b⌉): the grown footprints
    use: Bool  # scalar: exclude them (False when too few pixels would remain)

    def excluded(self, shape: tuple[int, int]) -> Bool:
        """The pixels to leave out, (ny, nx) for the image's `shape` (nothing when `use` is False)."""
        return _upsampled(self.blocks & self.use, block_size(shape), shape)

    def excluded_on_grid(self) -> Bool:
        """The pixels to leave out on the grid of every b-th row and column: `excluded(shape)[::b, ::b]`."""
        return self.blocks & self.use


def source_free(
    image: Image,
    variance: Image,
    good: Bool,
    psf,
    sources_xy=None,
    data: Bool | None = None,
    sigma=None,
    **kwargs,
) -> SourceFree:
    """The source footprints the noise estimates leave out of `good` (unless too few pixels would remain).

    Arguments:
        image, variance: (ny, nx).
        good: boolean (ny, nx): the pixels an estimate may use.
        data: boolean (ny, nx): the pixels the detection may read (default: all usable ones). Pass more than
            `good`: pixels left out of the estimate because they are already flagged as sources (DETECTED)
            must still be seen, or their stars go undetected and their wings stay in.
        psf: the image's `jd.Psf` (its width and size set σ and the smoothing half-width), or None
            (σ = `DEFAULT_SIGMA`).
        sigma: the PSF's width √((σx² + σy²)/2) when the caller has measured it already (traced scalar);
            default: measured here from `psf`.
        sources_xy: as `source_footprints`.
        kwargs: passed on to `source_footprints` (threshold, grow; the blocks are those of `MAX_PIXELS`, which
            `SourceFree.excluded` assumes).

    Returns:
        A `SourceFree`. Its `use` is False when fewer than `MIN_FREE_FRACTION` of the usable `good` pixels
        would remain, counted on the grid of every b-th row and column that `variance_factor` reads (every
        pixel up to 512²).
    """
    if psf is None:
        sigma, half = jnp.asarray(DEFAULT_SIGMA), math.ceil(4 * DEFAULT_SIGMA)
    else:
        sigma, half = (psf.sigma() if sigma is None else sigma), int(psf.size) // 2
    data = usable(image, variance) if data is None else data
    blocks = source_footprints(
        image, variance, data, sigma, sources_xy, half=half, max_pixels=MAX_PIXELS, blocks=True, **kwargs
    )
    b = block_size(image.shape)
    base = good[::b, ::b] & usable(image[::b, ::b], variance[::b, ::b])
    n_base, n_free = jnp.sum(base), jnp.sum(base & ~blocks)
    return SourceFree(blocks, n_free >= MIN_FREE_FRACTION * n_base)


def exposure_source_free(exposure, good: Bool, sources=None, sigma=None) -> SourceFree:
    """`source_free` of an `Exposure` with its PSF and the kernel `Sources` (parent coordinates) or None; the
    detection reads every usable pixel not flagged as `NOT_DATA` (DETECTED ones included). `sigma`: the PSF's
    width if already measured."""
    xy = None
    if sources is not None and len(sources):
        x0, y0 = exposure.xy0[0], exposure.xy0[1]
        xy = (sources.x - x0, sources.y - y0, sources.valid)
    data = (exposure.mask & bitmask(exposure.mask_planes, NOT_DATA)) == 0
    return source_free(exposure.image, exposure.variance, good, exposure.psf, xy, data=data, sigma=sigma)
