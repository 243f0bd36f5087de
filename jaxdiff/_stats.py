"""Robust statistics of masked images with fixed shapes (ALGORITHM §1 "Clipped statistics", §4.1).

Every function takes the values and a boolean `good` mask of the same shape instead of indexing with it, so
shapes stay static under `jit` and `vmap`. Large inputs may be reduced to a fixed regular (strided) subsample
with the static `max_samples`. Sums, sorts and quantiles run in `_types.solve_dtype()` (float64 when x64 is on).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from ._mask import PlaneTable, bitmask
from ._types import Array, Bool, Float, Image, MaskImage, Scalar, solve_dtype

STANDARD_EXCLUSIONS: tuple[str, ...] = (
    "INTRP",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SAT",
    "CR",
    "BAD",
    "NO_DATA",
)

# 0.7413 · IQR is the standard deviation of a Gaussian (1 / (2 · 0.6745)).
_IQR_TO_SIGMA = 0.7413


def _subsample(values, good, max_samples: int | None, cast: bool = True):
    """Flatten, cast to the accumulation dtype (unless not `cast`) and keep every s-th element so that at most
    max_samples remain."""
    flat, keep = jnp.ravel(values), jnp.ravel(good)
    if max_samples is not None and flat.size > max_samples:
        stride = math.ceil(flat.size / max_samples)
        flat, keep = flat[::stride], keep[::stride]
    return (flat.astype(solve_dtype()) if cast else flat), keep  # cast after striding: no image-sized copy


def _sortable_int(x):
    """An integer key with the order of the floats x (−0 just below +0, NaN above +inf); an involution."""
    itype = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
    bits = lax.bitcast_convert_type(x, itype)
    return jnp.where(bits < 0, bits ^ jnp.iinfo(itype).max, bits)


def _float_of_key(key, dtype):
    itype = key.dtype
    return lax.bitcast_convert_type(jnp.where(key < 0, key ^ jnp.iinfo(itype).max, key), dtype)


def sort_floats(x: Float[Array, " n"]) -> Float[Array, " n"]:
    """`jnp.sort` of a 1-D float array (or along the last axis) by way of order-preserving integer keys.

    XLA's CPU sort compares floats through a NaN-aware comparator: sorting 2¹⁸ float64 values took 53 ms on
    the 2-core development machine, the same values as int64 keys 17 ms (float32 → int32: 14 ms). The result
    is the same array; no gradient flows through it (`_order_statistics` supplies one).
    """
    keys = lax.sort(_sortable_int(lax.stop_gradient(x)), dimension=x.ndim - 1, is_stable=False)
    return _float_of_key(keys, x.dtype)


@jax.custom_jvp
def _order_statistics(x, index):
    """sorted(x)[index] (x 1-D, index an integer array); its derivative is that of the chosen elements."""
    return sort_floats(x)[index]


@_order_statistics.defjvp
def _order_statistics_jvp(primals, tangents):
    x, index = primals
    values = _order_statistics(x, index)
    # the element holding each value (any one of equal ones, as for jnp.sort); only built when differentiating
    position = jnp.argmax(x[None, :] == jnp.ravel(values)[:, None], axis=1).reshape(values.shape)
    return values, tangents[0][position]


def _quantiles_flat(flat, keep, q):
    """Linear-interpolated quantiles of flat[keep] via a sort with the rejected values moved to +inf.

    The sort runs in the values' own float dtype (a float32 sample sorts as int32 keys, faster than the int64 keys
    of a float64 copy, and the order statistics are the same numbers); positions and interpolation use the
    accumulation dtype, which is also the result's."""
    acc = jnp.result_type(flat.dtype, solve_dtype())
    if flat.dtype not in (jnp.float32, jnp.float64):  # the sortable keys are int32 or int64 bit patterns
        flat = flat.astype(acc)
    n = jnp.sum(keep)
    pos = jnp.asarray(q, acc) * jnp.maximum(n - 1, 0).astype(acc)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = pos - lo
    a, b = _order_statistics(jnp.where(keep, flat, jnp.inf), jnp.stack([lo, hi])).astype(acc)
    # a, b are finite whenever n > 0; the guard keeps inf out of the n == 0 branch and its gradient.
    a = jnp.where(n > 0, a, 0.0)
    b = jnp.where(n > 0, b, 0.0)
    return jnp.where(n > 0, a + frac * (b - a), jnp.nan)


def quantile_masked(
    values: Float[Array, "..."], good: Bool[Array, "..."], q, max_samples: int | None = None
) -> Float[Array, "..."]:
    """Quantiles of the good values (linear interpolation, as `numpy.quantile`).

    Arguments:
        values: any shape; entries where `good` is False are ignored (they may be NaN).
        good: boolean, same shape as `values`.
        q: a quantile in [0, 1] or an array of them.
        max_samples: static cap on the number of elements examined (a regular strided subsample); None: all.

    Returns:
        An array shaped like `q` in the accumulation dtype; NaN when no value is good.
    """
    flat, keep = _subsample(values, good, max_samples, cast=False)
    return _quantiles_flat(flat, keep, q)


def _mean_std(flat, keep):
    n = jnp.sum(keep)
    nf = n.astype(flat.dtype)
    x = jnp.where(keep, flat, 0.0)
    mean = jnp.sum(x) / jnp.maximum(nf, 1.0)
    ss = jnp.sum(jnp.where(keep, (x - mean) ** 2, 0.0)) / jnp.maximum(nf - 1.0, 1.0)
    std = jnp.where(ss > 0, jnp.sqrt(jnp.where(ss > 0, ss, 1.0)), 0.0)
    return jnp.where(n > 0, mean, jnp.nan), std, n


def clipped_mean_std(
    values: Float[Array, "..."],
    good: Bool[Array, "..."],
    n_iter: int = 3,
    nsigma: float = 3.0,
    max_samples: int | None = None,
) -> tuple[Scalar, Scalar, Array]:
    """Iteratively sigma-clipped mean and standard deviation (ALGORITHM §1).

    Pass 1 keeps values within nsigma·σ₀ of the median, σ₀ = 0.7413·IQR; each later pass keeps values within
    nsigma·std of the previous pass's mean.

    Arguments:
        values: any shape; entries where `good` is False are ignored (they may be NaN).
        good: boolean, same shape.
        n_iter: number of passes, static (default 3).
        nsigma: clipping threshold in standard deviations (default 3).
        max_samples: static cap on the number of elements examined (regular strided subsample); None: all.

    Returns:
        (mean, std, n): mean and sample standard deviation (ddof 1; 0 for a single value) of the values kept by
        the last pass, in the accumulation dtype, and their count. The mean is NaN when no value is good.
    """
    raw, keep = _subsample(values, good, max_samples, cast=False)
    flat = raw.astype(solve_dtype())
    med, q25, q75 = _quantiles_flat(raw, keep, jnp.array([0.5, 0.25, 0.75]))
    sigma0 = _IQR_TO_SIGMA * (q75 - q25)
    centre = jnp.where(keep, med, 0.0)
    sel = keep & (jnp.abs(flat - centre) <= _clip_limit(nsigma * sigma0, med, flat.dtype))
    mean, std, n = _mean_std(flat, sel)
    for _ in range(n_iter - 1):
        sel = keep & (jnp.abs(flat - mean) <= _clip_limit(nsigma * std, mean, flat.dtype))
        mean, std, n = _mean_std(flat, sel)
    return mean, std, n


def _clip_limit(limit, centre, dtype):
    """The clipping half-width, at least a few ulp of the centre.

    A nearly constant sample (a flat variance plane) has IQR 0 or a std of a few ulp. XLA may compute the
    same elementwise expression in two fusions with different rounding (FMA or not), so the values compared
    with the centre can differ from those that produced it by an ulp; an exact `<= 0` then keeps nothing and
    the mean is NaN (seen on float64 CPU: a score image's svar).
    """
    return jnp.maximum(limit, 16 * jnp.finfo(dtype).eps * jnp.abs(jnp.where(jnp.isfinite(centre), centre, 0.0)))


def _bin_centres(n: int, bin_size: int):
    nb = -(-n // bin_size)
    starts = jnp.arange(nb) * bin_size
    widths = jnp.minimum(bin_size, n - starts)
    return starts + (widths - 1) / 2


def _interp_matrix(n: int, centres) -> Float[Array, "n nb"]:
    """Weights of linear interpolation between bin centres, clamped outside them: shape (n, n_bins)."""
    nb = centres.shape[0]
    if nb == 1:
        return jnp.ones((n, 1), centres.dtype)
    pos = jnp.arange(n, dtype=centres.dtype)
    return jax.vmap(lambda e: jnp.interp(pos, centres, e), out_axes=1)(jnp.eye(nb, dtype=centres.dtype))


def median_background(image: Image, good: Bool[Array, "ny nx"], bin_size: int = 32, stride: int = 1) -> Image:
    """Smooth background: the median of the good pixels in bin_size² bins, bilinear between bin centres.

    Partial last bins are allowed (their centres sit at their own middles); interpolation is clamped beyond
    the outermost centres. Bins without a good pixel take the median of the other bins (0 if none has one).

    Arguments:
        image: (ny, nx).
        good: boolean (ny, nx); pixels to use.
        bin_size: bin side in pixels, static (default 32).
        stride: static; the bin medians read every stride-th row and column only ((bin_size / stride)² samples
            per bin; bin_size must be a multiple), the background is still evaluated at every pixel.

    Returns:
        The background, shape (ny, nx), in the image's dtype.
    """
    ny, nx = image.shape
    if bin_size % stride:
        raise ValueError(f"bin_size={bin_size} must be a multiple of stride={stride}")
    out_dtype = image.dtype
    image, good = image[::stride, ::stride], good[::stride, ::stride]
    full_bin, bin_size = bin_size, bin_size // stride
    sy, sx = image.shape  # same bin count as the full image: ⌈⌈n/s⌉/(b/s)⌉ = ⌈n/b⌉
    nby, nbx = -(-sy // bin_size), -(-sx // bin_size)
    pad = ((0, nby * bin_size - sy), (0, nbx * bin_size - sx))
    vals = jnp.pad(jnp.where(good, image, 0.0), pad)
    keep = jnp.pad(good, pad)

    def blocks(a):
        return a.reshape(nby, bin_size, nbx, bin_size).transpose(0, 2, 1, 3).reshape(nby * nbx, -1)

    med = jax.vmap(lambda v, g: quantile_masked(v, g, 0.5))(blocks(vals), blocks(keep))
    has = jnp.isfinite(med)
    fill = quantile_masked(med, has, 0.5)
    fill = jnp.where(jnp.isfinite(fill), fill, 0.0)
    med = jnp.where(has, med, fill).reshape(nby, nbx)
    dtype = solve_dtype()
    wy = _interp_matrix(ny, _bin_centres(ny, full_bin).astype(dtype))
    wx = _interp_matrix(nx, _bin_centres(nx, full_bin).astype(dtype))
    return (wy @ med @ wx.T).astype(out_dtype)


def grid_stride(shape: tuple[int, int], max_pixels: int) -> int:
    """The stride s (static) of a regular grid of every s-th row and column that keeps at most about `max_pixels`
    of an image of `shape`: 1 up to `max_pixels` pixels, else ⌈√(n_pixels / max_pixels)⌉."""
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels)))


def variance_factor(
    image: Image,
    variance: Image,
    good: Bool[Array, "ny nx"],
    bin_size: int = 32,
    max_samples: int | None = 2**20,
    max_pixels: int = 2**18,
    always_level: bool = True,
) -> tuple[Scalar, Scalar, Scalar, Array]:
    """Factor by which to scale a variance plane so that it matches the pixel noise (ALGORITHM §4.1).

    After subtracting `median_background`, the ratio estimate is (0.74·IQR(image/√variance))²; when it exceeds
    10 the level estimate (0.74·IQR(image))²/median(variance) is used instead. With fewer than 2 good pixels
    the factor is 1. The caller raises when both estimates exceed 10.

    Arguments:
        image: (ny, nx).
        variance: (ny, nx), image units squared.
        good: boolean (ny, nx); further restricted to finite image and variance > 0.
        bin_size: background bin side, static (default 32).
        max_samples: static cap on the pixels entering the quantiles (regular subsample; default 2²⁰).
        max_pixels: static cap on the pixels examined at all: larger images are read on a regular grid of every
            s-th row and column (s = ⌈√(n_pixels / max_pixels)⌉) with bins of bin_size samples (bin_size·s
            pixels), so the estimate costs the same at 4096² as at 512² (ALGORITHM §4.1 allows a subsample).
        always_level: compute the level estimate even when the ratio estimate is used (default); False
            computes it under `lax.cond` only when the ratio estimate exceeds 10 (it is NaN otherwise), which
            saves two of the three sorts (static).

    Returns:
        (factor, ratio_estimate, level_estimate, n_good): the factor to apply, both estimates (NaN with fewer
        than 2 good pixels) and the number of good pixels.
    """
    stride = grid_stride(image.shape, max_pixels)
    if stride > 1:
        image, variance, good = image[::stride, ::stride], variance[::stride, ::stride], good[::stride, ::stride]
        # bins keep bin_size samples per side (bin_size·s pixels): a median over fewer samples follows the noise
        # and shrinks the residual IQR (factor 0.94 with 8-sample bins, 0.98 with 16, 0.99 with 32)
    good = good & jnp.isfinite(image) & jnp.isfinite(variance) & (variance > 0)
    n_good = jnp.sum(good)
    bg = median_background(image, good, bin_size)
    resid = jnp.where(good, image - bg, 0.0)
    safe_var = jnp.where(good, variance, 1.0)
    q = jnp.array([0.25, 0.75])
    r25, r75 = quantile_masked(resid / jnp.sqrt(safe_var), good, q, max_samples)
    ratio_estimate = (0.74 * (r75 - r25)) ** 2

    def level(_):
        i25, i75 = quantile_masked(resid, good, q, max_samples)
        med_var = quantile_masked(safe_var, good, 0.5, max_samples)
        return (0.74 * (i75 - i25)) ** 2 / jnp.where(med_var > 0, med_var, 1.0)

    if always_level:
        level_estimate = level(None)
    else:
        nan = jnp.full((), jnp.nan, ratio_estimate.dtype)
        level_estimate = lax.cond(ratio_estimate > 10, level, lambda _: nan, None)
    enough = n_good >= 2
    ratio_estimate = jnp.where(enough, ratio_estimate, jnp.nan)
    level_estimate = jnp.where(enough, level_estimate, jnp.nan)
    factor = jnp.where(ratio_estimate > 10, level_estimate, ratio_estimate)
    return jnp.where(enough, factor, 1.0), ratio_estimate, level_estimate, n_good


def usable(image: Image, variance: Image, xp=jnp) -> Bool[Array, "ny nx"]:
    """Pixels with a finite image value and a finite, positive variance (`xp=np`: on the host, with numpy)."""
    return xp.isfinite(image) & xp.isfinite(variance) & (variance > 0)


def standard_good(image: Image, variance: Image, mask: MaskImage, planes_table: PlaneTable) -> Bool[Array, "ny nx"]:
    """Usable pixels free of the standard exclusions (INTRP, EDGE, DETECTED, DETECTED_NEGATIVE, SAT, CR, BAD,
    NO_DATA; planes absent from the table are skipped).

    Arguments:
        image, variance: (ny, nx).
        mask: integer bit mask (ny, nx).
        planes_table: static (name, bit) pairs of the mask.

    Returns:
        Boolean (ny, nx).
    """
    bits = bitmask(planes_table, STANDARD_EXCLUSIONS)
    return usable(image, variance) & ((mask & jnp.asarray(bits, mask.dtype)) == 0)
