"""Kernel stamps: candidate geometry, mask rejection, brightness ranking and fixed-size extraction.

Everything works on the science box (array coordinates of the science image); counts are masks,
never shapes: `select` returns a fixed number of slot indices plus a validity mask.
"""

import jax
import jax.numpy as jnp
from jax import lax

from ._types import Array, Bool, Float, Int


def centres(x, y, xy0) -> tuple[Int[Array, " n"], Int[Array, " n"]]:
    """Stamp centre pixels (column, row) in array coordinates: ⌊x + 0.5⌋ − x0, ⌊y + 0.5⌋ − y0."""
    cx = jnp.floor(jnp.nan_to_num(x) + 0.5).astype(jnp.int32) - xy0[0]
    cy = jnp.floor(jnp.nan_to_num(y) + 0.5).astype(jnp.int32) - xy0[1]
    return cx, cy


def usable_candidates(
    cx, cy, valid: Bool[Array, " n"], bad: Bool[Array, "ny nx"], half: int, margin: int
) -> Bool[Array, " n"]:
    """Candidates whose (2·half + 1)² stamp lies inside the box shrunk by `margin` and has no bad pixel.

    Each candidate's stamp of the bad-pixel plane is read directly (n·(2·half + 1)² reads), which costs far
    less than a whole-image prefix sum for the few hundred to few thousand candidates of an image.

    Arguments:
        cx, cy: stamp centres in array coordinates.
        valid: the sources' validity mask.
        bad: bad-pixel plane of the science box (excluded mask planes or unusable, either image).
        half: stamp half side (k for a (2k + 1)² stamp), static.
        margin: extra shrink of the box (k when restricting edge sources), static.
    """
    ny, nx = bad.shape
    lo = half + margin
    inside = (cx >= lo) & (cy >= lo) & (cx <= nx - 1 - lo) & (cy <= ny - 1 - lo)
    nbad = jnp.sum(extract(bad, cy - half, cx - half, 2 * half + 1), axis=(1, 2))
    return valid & inside & (nbad == 0)


def rank_and_pack(score: Float[Array, " n"], ok: Bool[Array, " n"], n_slots: int):
    """The `n_slots` best candidates by score (brightest first), padded with invalid slots.

    Returns:
        (index (n_slots,), slot_valid (n_slots,)): indices into the candidate list; slots beyond the
        number of usable candidates are marked invalid (their index points at some candidate but
        they get weight 0 downstream).
    """
    key = jnp.where(ok, jnp.nan_to_num(score, nan=-jnp.inf, posinf=jnp.finfo(score.dtype).max), -jnp.inf)
    key = jnp.where(ok & jnp.isinf(key), jnp.finfo(score.dtype).min, key)
    _, index = lax.top_k(key, n_slots)
    slot_valid = ok[index]
    return index, slot_valid


def extract(image, r0, c0, size: int):
    """Stamps of side `size` whose top-left corners are (r0, c0), shape (n, size, size) (starts clamped)."""

    def one(r, c):
        return lax.dynamic_slice(image, (r, c), (size, size))

    return jax.vmap(one)(r0, c0)


def cell_rank(cx, cy, priority, eligible, size_cell: int) -> Int[Array, " n"]:
    """For each slot, how many eligible slots of the same cell come before it in priority order.

    Arguments:
        cx, cy: stamp centres (array coordinates).
        priority: lower values come first (e.g. the slot index after ranking by flux).
        eligible: slots that compete for a place.
        size_cell: cell side in pixels (static).
    """
    cell_x = cx // size_cell
    cell_y = cy // size_cell
    same = (cell_x[:, None] == cell_x[None, :]) & (cell_y[:, None] == cell_y[None, :])
    before = priority[None, :] < priority[:, None]
    return jnp.sum(same & before & eligible[None, :], axis=1)


CHUNK = 64  # slots per chunk of `over_slots`: a chunk with a star computes all its slots, one loop step each


def batch_any(pred: Bool[Array, ""], axis_name: str | None) -> Bool[Array, ""]:
    """`pred` of one pair, or, inside a batch vmapped with `axis_name`, whether it holds for any pair of the batch.

    A predicate shared by the whole batch is not batched, so a `lax.cond` on it stays a branch under `vmap`
    (a batched predicate turns it into a select that runs both branches for every pair).
    """
    if axis_name is None:
        return pred
    return lax.psum(pred.astype(jnp.int32), axis_name) > 0


def over_slots(fn, valid: Bool[Array, " N"], *slots, fill=0.0, axis_name: str | None = None):
    """`fn(*slots)` for N stamp slots, chunk by chunk, skipping chunks that hold no valid slot.

    The slot count N is a fixed shape (the plan's), but the work follows the number of stars: a chunk of
    `CHUNK` slots without a valid one returns `fill` instead of running `fn` (`lax.cond` skips the branch on
    CPU and GPU). Under a plain `vmap` both branches run; a batch that names its vmap axis (`axis_name`) skips a
    chunk where no pair of the batch has a valid slot (slots are packed valid first, so the chunks beyond the
    batch's largest star count), and a pair's own empty chunks inside that range compute and are then replaced
    by `fill`, as a single call would give. `fn` maps leading-axis-n arrays to a pytree of leading-axis-n
    arrays, for any n.

    Arguments:
        fn: the per-slot computation, vectorised over the leading axis.
        valid: (N,) bool, the slots that hold a stamp.
        *slots: arrays with leading axis N.
        fill: value of the outputs of skipped chunks.
        axis_name: the vmap axis name of a batch (None: one pair, or a vmap without a name).
    """
    n = valid.shape[0]
    if n <= CHUNK or n % CHUNK:
        return fn(*slots)
    n_chunks = n // CHUNK
    shapes = jax.eval_shape(fn, *(a[:CHUNK] for a in slots))

    def skipped():
        return jax.tree.map(lambda s: jnp.full(s.shape, fill, s.dtype), shapes)

    def one(i):
        mine = jnp.any(lax.dynamic_slice_in_dim(valid, i * CHUNK, CHUNK))
        # the chunk is cut out inside the taken branch: a skipped chunk reads none of its inputs
        taken = lambda: fn(*(lax.dynamic_slice_in_dim(a, i * CHUNK, CHUNK) for a in slots))
        out = lax.cond(batch_any(mine, axis_name), taken, skipped)
        if axis_name is None:
            return out
        return jax.tree.map(lambda o: jnp.where(mine, o, jnp.asarray(fill, o.dtype)), out)

    out = lax.map(one, jnp.arange(n_chunks))
    return jax.tree.map(lambda o: o.reshape((n,) + o.shape[2:]), out)
