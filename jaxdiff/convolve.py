"""Fixed and spatially varying convolution of image, variance and mask (ALGORITHM §9).

Convolution: (K ∗ I)(x, y) = Σ_{u,v} K(u, v) I(x − u, y − v) with kernel element [h + v, h + u] = offset
(u, v), so a one-hot kernel at (u, v) = (1, 0) gives out(x, y) = in(x − 1, y). Transforms are real FFTs of
overlap-save tiles (ALGORITHM §16): each image is transformed once, tile by tile, and multiplied by the tile-sized
transforms of all kernels, so kernel transforms stay small and there is no wrap-around in the kept outputs.
A spatially varying kernel K(x, y) = Σ_p f_p(x, y) K′_p is applied exactly as Σ_p f_p (K′_p ∗ I), its variance
as Σ_{j≤j′} (2 − δ_jj′) f_j f_j′ ((K′_j ⊙ K′_j′) ∗ V).
"""

import math
from functools import cache

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._mask import dilate
from ._types import Array, Bool, Float, Image, Kernel, MaskImage

# Tile FFT lengths: batched 512-1024 tiles ran faster than one image-sized transform on a 2-core CPU and keep
# kernel transforms small (ALGORITHM §16).
_MIN_TILE = 512
_MAX_TILE = 1024


@cache
def _fast_lengths(limit: int = 1 << 17) -> tuple[int, ...]:
    """Sorted even lengths whose only prime factors are 2, 3 and 5."""
    out = []
    p2 = 2
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return tuple(sorted(out))


def next_fast_len(n: int) -> int:
    """Smallest even length ≥ n with prime factors 2, 3 and 5 only (a fast real-FFT size)."""
    return next(m for m in _fast_lengths() if m >= n)


@cache
def _axis_plan(n: int, h: int, max_tile: int) -> tuple[int, int, int]:
    """Overlap-save layout along one axis: (FFT length L, outputs per tile T, tile count).

    Each tile reads T + 2h inputs and keeps T outputs; the choice minimises nt·L·log2(L) among one tile
    covering the axis and tiles of a fast length in [_MIN_TILE, max_tile].
    """
    single = next_fast_len(n + 2 * h)
    best = (single * math.log2(single), single, n, 1)
    for length in _fast_lengths():
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


def _tiles(x: Image, plan, h: int) -> Float[Array, "nty ntx ly lx"]:
    """Overlapping tiles of the zero-padded image: tile (i, j) starts at padded index (i·T_y, j·T_x)."""
    for axis, (length, out, nt) in enumerate(plan):
        n = x.shape[axis + (x.ndim - 2)]
        pad = [(0, 0)] * x.ndim
        pad[x.ndim - 2 + axis] = (h, (nt - 1) * out + length - h - n)
        x = jnp.pad(x, pad)
        ax = x.ndim - 2 + axis
        x = jnp.stack([lax.slice_in_dim(x, i * out, i * out + length, axis=ax) for i in range(nt)], axis=axis)
    return x


def _kernel_spectra(kernels: Float[Array, "q k k"], plan, dtype):
    """Real FFTs of kernels zero-padded to the tile size with the centre at index (0, 0)."""
    (ly, _, _), (lx, _, _) = plan
    h = kernels.shape[-1] // 2
    padded = jnp.pad(kernels.astype(dtype), ((0, 0), (0, ly - kernels.shape[-2]), (0, lx - kernels.shape[-1])))
    return jnp.fft.rfft2(jnp.roll(padded, (-h, -h), axis=(-2, -1)))


def _spectra(image: Image, plan, h: int):
    """Real FFTs of the overlap-save tiles of an image: (nty, ntx, ly, lx // 2 + 1)."""
    return jnp.fft.rfft2(_tiles(image, plan, h))


def _combine(spec, kernels: Float[Array, "q k k"], wy: Float[Array, "q ny"], wx: Float[Array, "q nx"], plan, shape):
    """Σ_q wy[q, y] · wx[q, x] · (kernel_q ∗ image)(x, y) from the tile spectra of the image.

    The weighted sum runs on the kept part of each tile, so only one plane is reassembled.
    """
    h = kernels.shape[-1] // 2
    (ly, oy, nty), (lx, ox, ntx) = plan
    dtype = wy.dtype
    kspec = _kernel_spectra(kernels, plan, dtype)
    convs = jnp.fft.irfft2(spec[None] * kspec[:, None, None], s=(ly, lx)).astype(dtype)
    kept = convs[:, :, :, h : h + oy, h : h + ox]
    wy_t = jnp.pad(wy, ((0, 0), (0, nty * oy - shape[0]))).reshape(-1, nty, 1, oy, 1)
    wx_t = jnp.pad(wx, ((0, 0), (0, ntx * ox - shape[1]))).reshape(-1, 1, ntx, 1, ox)
    tiles = jnp.sum(wy_t * wx_t * kept, axis=0)
    return tiles.transpose(0, 2, 1, 3).reshape(nty * oy, ntx * ox)[: shape[0], : shape[1]]


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
    plan = _plan(image.shape, h)
    ones_y = jnp.ones((1, image.shape[0]), image.dtype)
    ones_x = jnp.ones((1, image.shape[1]), image.dtype)
    return _combine(_spectra(image, plan, h), kernel[None], ones_y, ones_x, plan, image.shape)


def _box_any(flag: Bool[Array, "ny nx"], h: int, outside: bool) -> Bool[Array, "ny nx"]:
    """Whether the (2h + 1)² box around each pixel holds a set flag; pixels beyond the array count as `outside`."""
    f = jnp.pad(flag.astype(jnp.int8), h, constant_values=int(outside))
    k = 2 * h + 1
    f = lax.reduce_window(f, jnp.int8(0), lax.max, (k, 1), (1, 1), "VALID")
    f = lax.reduce_window(f, jnp.int8(0), lax.max, (1, k), (1, 1), "VALID")
    return f > 0


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

    Returns:
        (image, variance, mask), each with the input's shape and dtype. Outputs whose box held a non-finite
        image (variance) value are NaN in the image (variance); outputs whose box touches an invalid pixel or
        leaves the array take the unconvolved input pixel with EDGE added.
    """
    h = _check_kernel(kernels.shape)
    plan = _plan(image.shape, h)
    p = kernels.shape[0]
    dtype, vdtype = image.dtype, variance.dtype
    tx_i, ty_i = tx.astype(dtype), ty.astype(dtype)
    offset = jnp.asarray(offset, dtype)

    image_ok = jnp.isfinite(image)
    flat = jnp.where(image_ok, image - offset, 0.0).astype(dtype)
    out = _combine(_spectra(flat, plan, h), kernels, ty_i, tx_i, plan, image.shape)
    ksum = jnp.sum(kernels, axis=(1, 2)).astype(dtype)
    out = out + offset * ((ty_i.T * ksum) @ tx_i)

    j, jp = np.triu_indices(p)
    pair_weight = np.where(j == jp, 1.0, 2.0)
    var_ok = jnp.isfinite(variance)
    flat_var = jnp.where(var_ok, variance, 0.0).astype(vdtype)
    wy = (ty[j] * ty[jp]).astype(vdtype)
    wx = (jnp.asarray(pair_weight, tx.dtype)[:, None] * tx[j] * tx[jp]).astype(vdtype)
    vout = _combine(_spectra(flat_var, plan, h), kernels[j] * kernels[jp], wy, wx, plan, image.shape)

    out = jnp.where(_box_any(~image_ok, h, False), jnp.nan, out)
    vout = jnp.where(_box_any(~var_ok, h, False), jnp.nan, vout)

    keep = jnp.asarray(preserve_bits, mask.dtype)
    mout = (dilate(mask, h) & ~keep) | (mask & keep)

    invalid = jnp.zeros(image.shape, bool) if valid is None else ~valid
    edge = _box_any(invalid, h, True)
    out = jnp.where(edge, image, out)
    vout = jnp.where(edge, variance, vout)
    mout = jnp.where(edge, mask | jnp.asarray(1 << edge_bit, mask.dtype), mout)
    return out, vout, mout
