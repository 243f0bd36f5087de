"""Fixed and spatially varying convolution of image, variance and mask (ALGORITHM §9).

Convolution: (K ∗ I)(x, y) = Σ_{u,v} K(u, v) I(x − u, y − v) with kernel element [h + v, h + u] = offset
(u, v), so a one-hot kernel at (u, v) = (1, 0) gives out(x, y) = in(x − 1, y). Transforms are real FFTs of
overlap-save tiles (ALGORITHM §16), so kernel transforms stay tile-sized and there is no wrap-around in the kept
outputs. A spatially varying kernel K(x, y) = Σ_p f_p(x, y) K′_p is applied exactly as Σ_p f_p (K′_p ∗ I), its
variance as Σ_{j≤j′} (2 − δ_jj′) f_j f_j′ ((K′_j ⊙ K′_j′) ∗ V). Because the f_p are polynomials, the weights are
moved onto the input (`_spatial_apply`): Σ_{m+n≤d} G_mn ∗ (ξ^m η^n I) with small combined kernels G_mn, which is
d-dependent forward transforms of weighted inputs and one inverse transform (4 + 7 at spatial order 1, the
same count as one forward and P inverse transforms, but inverse real FFTs cost 1.8× forward ones here and the
weighted sum of P convolved planes disappears).
"""

import math
from functools import cache, reduce

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._mask import dilate
from ._types import Array, Bool, Float, Image, Kernel, MaskImage

# Tile FFT lengths: batched 512-1024 tiles ran faster than one image-sized transform on a 2-core CPU and keep
# kernel transforms small (ALGORITHM §16).
_MIN_TILE = 512
_MAX_TILE = 1024


# Prime factors of FFT lengths: image-sized grids take 7 too (ducc transforms 2100² and 4200² in less time than
# the next 2-3-5 lengths 2160² and 4320²; benchmarks/README.md); overlap-save tiles keep their measured 2-3-5 lengths.
_GRID_PRIMES = (2, 3, 5, 7)
_TILE_PRIMES = (2, 3, 5)


@cache
def _fast_lengths(primes: tuple[int, ...], limit: int = 1 << 17) -> tuple[int, ...]:
    """Sorted even lengths ≤ `limit` whose only prime factors are `primes` (2 × a product of them)."""
    out = {2}
    for p in primes:
        grown = set(out)
        for m in out:
            while m * p <= limit:
                m *= p
                grown.add(m)
        out = grown
    return tuple(sorted(out))


def next_fast_len(n: int, primes: tuple[int, ...] = _GRID_PRIMES) -> int:
    """Smallest even length ≥ n whose only prime factors are `primes` (default 2, 3, 5, 7: a fast real-FFT size)."""
    return next(m for m in _fast_lengths(primes) if m >= n)


@cache
def _axis_plan(n: int, h: int, max_tile: int) -> tuple[int, int, int]:
    """Overlap-save layout along one axis: (FFT length L, outputs per tile T, tile count).

    Each tile reads T + 2h inputs and keeps T outputs; the choice minimises nt·L·log2(L) among one tile
    covering the axis and tiles of a fast length in [_MIN_TILE, max_tile].
    """
    single = next_fast_len(n + 2 * h, _TILE_PRIMES)
    best = (single * math.log2(single), single, n, 1)
    for length in _fast_lengths(_TILE_PRIMES):
        if length > max_tile:
            break
        if length < _MIN_TILE:
            continue
        out = length - 2 * h
        if out < 2 * h or out >= n:
            continue
        nt = -(-n // out)
        cost = nt * length * math.log2(length)
        if cost < best[0]:
            best = (cost, length, out, nt)
    return best[1:]


def _plan(shape: tuple[int, int], h: int, max_tile: int = _MAX_TILE):
    return tuple(_axis_plan(n, h, max_tile) for n in shape)


def _kernel_spectra(kernels: Float[Array, "q k k"], plan, dtype):
    """Real FFTs of kernels zero-padded to the tile size with the centre at index (0, 0)."""
    (ly, _, _), (lx, _, _) = plan
    h = kernels.shape[-1] // 2
    padded = jnp.pad(kernels.astype(dtype), ((0, 0), (0, ly - kernels.shape[-2]), (0, lx - kernels.shape[-1])))
    return jnp.fft.rfft2(jnp.roll(padded, (-h, -h), axis=(-2, -1)))


def _monomials(n: int, degree: int, dtype, xp=jnp):
    """ξ^m for m = 0..degree on an axis of n pixels, ξ = (i − c)/s ∈ [−1, 1] (c, s: centre and half length);
    `xp=numpy` for a constant of the program."""
    c, s = (n - 1) / 2, max((n - 1) / 2, 1.0)
    xi = (xp.arange(n, dtype=dtype) - c) / s
    return xp.stack([xi**m for m in range(degree + 1)]), s


def _poly_coefficients(w: Float[Array, "q n"], degree: int) -> Float[Array, "q d"]:
    """Coefficients in ξ^m of rows of `w` that are polynomials of degree ≤ `degree` in the pixel index.

    Exact interpolation at degree + 1 pixels near the Chebyshev nodes of the axis (a well-conditioned square
    Vandermonde system); rows that are not such polynomials are approximated, not detected.
    """
    n = w.shape[-1]
    d = min(degree, n - 1)
    nodes = np.unique(np.round((n - 1) / 2 * (1 - np.cos(np.pi * (np.arange(d + 1) + 0.5) / (d + 1)))).astype(int))
    if nodes.size < d + 1:  # tiny axis: use its first d + 1 pixels
        nodes = np.arange(d + 1)
    powers, _ = _monomials(n, d, np.float64, np)
    vander = powers[:, nodes].T  # (d + 1 nodes, d + 1 powers)
    # the system is static: its inverse is a constant of the program, not a solve compiled into it
    coef = w[:, nodes] @ jnp.asarray(np.linalg.inv(vander).T, w.dtype)
    return jnp.pad(coef, ((0, 0), (0, degree - d)))


def _shifted_factors(coef: Float[Array, "q d"], h: int, scale: float) -> Float[Array, "q d k"]:
    """F[q, m, h + u] = Σ_{i ≥ m} coef[q, i] C(i, m) (u/scale)^(i − m): the weight that input plane ξ^m gets at
    kernel offset u, from ξ(out)^i = (ξ(in) + u/scale)^i (the output at x reads the input at x − u)."""
    d = coef.shape[-1] - 1
    u = jnp.arange(-h, h + 1, dtype=coef.dtype) / scale
    binom = np.array([[math.comb(i, m) for i in range(d + 1)] for m in range(d + 1)], float)  # [m, i]
    expo = np.maximum(np.arange(d + 1)[None, :] - np.arange(d + 1)[:, None], 0)  # [m, i] = i − m
    upow = u[None, None, :] ** jnp.asarray(expo)[:, :, None]  # [m, i, u]
    return jnp.einsum("qi,mi,miu->qmu", coef, jnp.asarray(binom, coef.dtype), upow)


def _plane_exponents(degree: int) -> tuple[tuple[int, int], ...]:
    """(m, n) exponents of the input planes ξ^m η^n with m + n ≤ degree."""
    return tuple((d - j, j) for d in range(degree + 1) for j in range(d + 1))


def _spatial_apply(
    image: Image,
    kernels: Float[Array, "q k k"],
    wy: Float[Array, "q ny"],
    wx: Float[Array, "q nx"],
    degree: int,
    plan,
) -> Image:
    """Σ_q wy[q, y] · wx[q, x] · (kernel_q ∗ image)(x, y) for polynomial weights of total degree ≤ `degree`.

    A polynomial weight moves through the convolution: with ξ the normalised column, ξ(x)^i = Σ_m C(i, m)
    ξ(x − u)^m (u/s)^(i − m), so the sum equals Σ_{m,n} G_mn ∗ (ξ^m η^n · image) with small combined kernels
    G_mn. That is one forward transform per input plane and a single inverse transform, instead of one inverse
    per component: a real inverse FFT cost 1.8× a forward one on the 2-core development machine, and the
    weighted sum of q full convolved planes disappears. Overlap-save tiles are processed one row of tiles at
    a time (`lax.fori_loop`), each row written in place into the result, so memory stays at a few image-sized
    arrays.
    """
    h = kernels.shape[-1] // 2
    (ly, oy, nty), (lx, ox, ntx) = plan
    ny, nx = image.shape
    dtype = image.dtype
    sdt = wy.dtype
    cy, cx = _poly_coefficients(wy, degree), _poly_coefficients(wx, degree)
    ey, sy = _monomials(ny, degree, sdt)
    ex, sx = _monomials(nx, degree, sdt)
    fy, fx = _shifted_factors(cy, h, sy), _shifted_factors(cx, h, sx)  # (q, d, k)
    planes = _plane_exponents(degree)
    pm = np.array([m for m, _ in planes])
    pn = np.array([n for _, n in planes])
    g = jnp.einsum("qvu,qpu,qpv->pvu", kernels.astype(sdt), fx[:, pm], fy[:, pn])  # (n_planes, k, k)
    gspec = _kernel_spectra(g, plan, dtype)

    # The last tile of each axis ends at the image's edge (it starts at n − T and overlaps its neighbour), so the
    # strips are written into an output of the image's shape and the pad is the same on both sides.
    pad_y = (h, ly - oy - h)
    pad_x = (h, lx - ox - h)
    padded = jnp.pad(image, (pad_y, pad_x))
    wyp = jnp.pad(ey[pn].astype(dtype), ((0, 0), pad_y))  # (n_planes, padded ny)
    wxp = jnp.pad(ex[pm].astype(dtype), ((0, 0), pad_x))
    starts = np.minimum(np.arange(ntx) * ox, nx - ox)
    cols = starts[:, None] + np.arange(lx)[None, :]  # (ntx, lx) padded column of each tile pixel
    wx_tiles = wxp[:, cols]  # (n_planes, ntx, lx)
    last = ntx * ox - nx  # the last tile's first column not already written by the others

    def strip(r):
        rows = lax.dynamic_slice_in_dim(padded, r, ly, axis=0)  # (ly, padded nx)
        wy_rows = lax.dynamic_slice_in_dim(wyp, r, ly, axis=1)  # (n_planes, ly)
        tiles = rows[:, cols].transpose(1, 0, 2)  # (ntx, ly, lx)
        weighted = tiles[None] * wy_rows[:, None, :, None] * wx_tiles[:, :, None, :]
        spec = jnp.sum(jnp.fft.rfft2(weighted) * gspec[:, None], axis=0)
        out = jnp.fft.irfft2(spec, s=(ly, lx))[:, h : h + oy, h : h + ox].astype(dtype)  # (ntx, oy, ox)
        inner = out[: ntx - 1].transpose(1, 0, 2).reshape(oy, (ntx - 1) * ox)
        return jnp.concatenate([inner, out[-1][:, last:]], axis=1)  # (oy, nx)

    def row_of_tiles(i, result):
        r = jnp.minimum(i * oy, ny - oy)
        return lax.dynamic_update_slice_in_dim(result, strip(r), r, axis=0)

    return lax.fori_loop(0, nty, row_of_tiles, jnp.zeros((ny, nx), dtype))


def _check_kernel(kernel_shape) -> int:
    ky, kx = kernel_shape[-2:]
    if ky != kx or ky % 2 == 0:
        raise ValueError(f"kernels must be square and odd-sized; got shape {tuple(kernel_shape)}")
    return ky // 2


def convolve(image: Image, kernel: Kernel) -> Image:
    """Convolve a finite image with a fixed kernel, treating pixels outside the array as zero.

    Arguments:
        image: (ny, nx), finite values.
        kernel: (k, k), k odd; element [h + v, h + u] is offset (u, v).

    Returns:
        K ∗ image, same shape and dtype as `image`.
    """
    h = _check_kernel(kernel.shape)
    ones_y = jnp.ones((1, image.shape[0]), image.dtype)
    ones_x = jnp.ones((1, image.shape[1]), image.dtype)
    return _spatial_apply(image, kernel[None], ones_y, ones_x, 0, _plan(image.shape, h))


def _box_any(flag: Bool[Array, "ny nx"], h: int, outside: bool) -> Bool[Array, "ny nx"]:
    """Whether the (2h + 1)² box around each pixel holds a set flag; pixels beyond the array count as `outside`."""
    f = jnp.pad(flag.astype(jnp.int8), h, constant_values=int(outside))
    k = 2 * h + 1
    f = lax.reduce_window(f, jnp.int8(0), lax.max, (k, 1), (1, 1), "VALID")
    f = lax.reduce_window(f, jnp.int8(0), lax.max, (1, k), (1, 1), "VALID")
    return f > 0


def _box_flags(mask: MaskImage, flags, bits: tuple[int, ...], h: int, crop):
    """`_box_any` of each flag (the last one counting pixels beyond the array) and the dilated mask, from one
    dilation of the mask with the flags written into `bits`, bits that no mask plane uses; all cropped to `crop`.
    """
    values = [jnp.asarray(1 << b, mask.dtype) for b in bits]
    packed = mask
    for flag, value in zip(flags, values, strict=True):
        packed = packed | jnp.where(flag, value, jnp.zeros((), mask.dtype))
    grown = dilate(packed, h)[crop]
    found = [(grown & v) != 0 for v in values]
    rows, cols = crop
    ny, nx = mask.shape
    if rows.start < h or cols.start < h:  # kept pixels whose box leaves the array: the last flag counts them
        r = lax.broadcasted_iota(jnp.int32, grown.shape, 0) + rows.start
        q = lax.broadcasted_iota(jnp.int32, grown.shape, 1) + cols.start
        found[-1] = found[-1] | (r < h) | (r >= ny - h) | (q < h) | (q >= nx - h)
    cleared = grown & ~reduce(jnp.bitwise_or, values)
    return (*found, cleared)


def convolve_spatial(
    image: Image,
    variance: Image,
    mask: MaskImage,
    kernels: Float[Array, "p k k"],
    tx: Float[Array, "p nx"],
    ty: Float[Array, "p ny"],
    *,
    valid: Bool[Array, "ny nx"] | None = None,
    edge_bit: int,
    preserve_bits: int = 0,
    offset: Float[Array, ""] | float = 0.0,
    degree: int | None = None,
    interior: int = 0,
    spare_bits: tuple[int, ...] = (),
) -> tuple[Image, Image, MaskImage]:
    """Apply a spatially varying kernel K(x, y) = Σ_p f_p(x, y) K′_p to image, variance and mask (ALGORITHM §9).

    Arguments:
        image: (ny, nx).
        variance: (ny, nx), image units squared.
        mask: integer bit mask (ny, nx).
        kernels: the kernel components K′_p, (P, k, k), k odd, element [h + v, h + u] = offset (u, v).
        tx, ty: separable spatial terms: f_p at pixel [r, c] is ty[p, r] · tx[p, c].
        valid: pixels holding real data (False: padding outside the input); default all True.
        edge_bit: the EDGE bit number (static), added where the k × k box is not all valid and in-array.
        preserve_bits: bits (static) that keep their undilated input value instead of being OR-ed over the box.
        offset: a level subtracted before transforming and added back times the local kernel sum (the median
            trick of ALGORITHM §14; exact); default 0.
        degree: total polynomial degree (static) of the weights f_p in the pixel coordinates; default the
            spatial order whose term count is P (0, 1, 2 for P = 1, 3, 6). The weights must be such
            polynomials (as `spatial.separable_terms` are): they are carried through the transforms exactly.
        interior: return only pixels at least this far from the border (static; e.g. h for a cut-out grown
            by h around the box wanted), so no full-sized result is formed and then cropped; default 0.
        spare_bits: mask bits (static) that no plane uses. With three of them the box tests (non-finite image,
            non-finite variance, invalid pixels) are carried in those bits through the mask's own dilation, one
            pass instead of four; they are cleared from the returned mask. Default: separate passes.

    Returns:
        (image, variance, mask), each with the input's dtype and shape (less 2·interior per axis). Outputs
        whose box held a non-finite image (variance) value are NaN in the image (variance); outputs whose box
        touches an invalid pixel or leaves the array take the unconvolved input pixel with EDGE added.
    """
    h = _check_kernel(kernels.shape)
    plan = _plan(image.shape, h)
    p = kernels.shape[0]
    if degree is None:
        degree = next(o for o in range(p + 1) if (o + 1) * (o + 2) // 2 >= p)
    dtype, vdtype = image.dtype, variance.dtype
    wdt = jnp.result_type(tx.dtype, ty.dtype, dtype)  # fit the weight polynomials at the weights' precision
    tx, ty = tx.astype(wdt), ty.astype(wdt)
    offset = jnp.asarray(offset, dtype)

    image_ok = jnp.isfinite(image)
    flat = jnp.where(image_ok, image - offset, 0.0).astype(dtype)
    out = _spatial_apply(flat, kernels, ty, tx, degree, plan)
    ksum = jnp.sum(kernels, axis=(1, 2)).astype(dtype)

    j, jp = np.triu_indices(p)
    pair_weight = np.where(j == jp, 1.0, 2.0)
    var_ok = jnp.isfinite(variance)
    flat_var = jnp.where(var_ok, variance, 0.0).astype(vdtype)
    wy = ty[j] * ty[jp]
    wx = jnp.asarray(pair_weight, wdt)[:, None] * tx[j] * tx[jp]
    vout = _spatial_apply(flat_var, kernels[j] * kernels[jp], wy, wx, 2 * degree, plan)

    keep = jnp.asarray(preserve_bits, mask.dtype)
    invalid = jnp.zeros(image.shape, bool) if valid is None else ~valid
    c = (slice(interior, image.shape[0] - interior), slice(interior, image.shape[1] - interior))
    # everything below is elementwise on the kept interior: the crop fuses into it, nothing full-sized is copied
    # the offset comes back times the local kernel sum, written elementwise so that it fuses (no image-sized
    # matrix product held from before the transforms)
    tyc, txc = ty[:, c[0]].astype(dtype), tx[:, c[1]].astype(dtype)
    level = sum((tyc[q] * ksum[q])[:, None] * txc[q][None, :] for q in range(p))
    width = jnp.iinfo(mask.dtype).bits - jnp.issubdtype(mask.dtype, jnp.signedinteger)
    if any(not 0 <= b < width for b in spare_bits):
        raise ValueError(f"spare_bits {tuple(spare_bits)} must be bits 0..{width - 1} of the {mask.dtype} mask")
    if len(spare_bits) >= 3:
        nan_img, nan_var, edge, grown = _box_flags(mask, (~image_ok, ~var_ok, invalid), spare_bits[:3], h, c)
    else:
        nan_img, nan_var = _box_any(~image_ok, h, False)[c], _box_any(~var_ok, h, False)[c]
        edge, grown = _box_any(invalid, h, True)[c], dilate(mask, h)[c]
    out = jnp.where(nan_img, jnp.nan, out[c] + offset * level)
    vout = jnp.where(nan_var, jnp.nan, vout[c])
    mout = (grown & ~keep) | (mask[c] & keep)
    out = jnp.where(edge, image[c], out)
    vout = jnp.where(edge, variance[c], vout)
    mout = jnp.where(edge, mask[c] | jnp.asarray(1 << edge_bit, mask.dtype), mout)
    return out, vout, mout
