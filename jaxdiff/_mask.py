"""Mask planes (LSST bit conventions) and name-to-bit lookup."""

from collections.abc import Iterable

import jax.numpy as jnp
from jax import lax

MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
}

DEFAULT_PLANES: tuple[tuple[str, int], ...] = tuple(MASK_PLANES.items())

PlaneTable = tuple[tuple[str, int], ...]


def as_plane_table(planes) -> PlaneTable:
    """Normalise a dict or pair sequence to a sorted-by-bit tuple of (name, bit) pairs (hashable, static)."""
    if planes is None:
        return DEFAULT_PLANES
    items = planes.items() if isinstance(planes, dict) else planes
    table = tuple(sorted(((str(n), int(b)) for n, b in items), key=lambda nb: nb[1]))
    bits = [b for _, b in table]
    if len(set(bits)) != len(bits) or any(b < 0 or b > 30 for b in bits):
        raise ValueError(f"mask plane table {table!r} has repeated bits or bits outside 0..30")
    return table


def plane_bit(table: PlaneTable, name: str) -> int | None:
    """The bit of a named plane, or None when the table lacks it."""
    for n, b in table:
        if n == name:
            return b
    return None


def bitmask(table: PlaneTable, names: Iterable[str]) -> int:
    """OR of the bits of the named planes present in the table (absent planes are skipped)."""
    value = 0
    for name in names:
        b = plane_bit(table, name)
        if b is not None:
            value |= 1 << b
    return value


def add_planes(table: PlaneTable, names: Iterable[str]) -> PlaneTable:
    """Give each missing plane the lowest free bit."""
    table = tuple(table)
    for name in names:
        if plane_bit(table, name) is None:
            used = {b for _, b in table}
            free = next(b for b in range(31) if b not in used)
            table = table + ((name, free),)
    return as_plane_table(table)


def free_bits(table: PlaneTable, n: int) -> tuple[int, ...]:
    """The lowest `n` bits (0..30) that no plane of the table uses; fewer when the table leaves fewer free."""
    used = {b for _, b in table}
    return tuple(b for b in range(31) if b not in used)[:n]


def dilate(mask, half: int, axis_order=(0, 1)):
    """OR every pixel's bits over a (2h+1)² box, separably (a mask growth by h pixels).

    Arguments:
        mask: integer bit mask, shape (ny, nx).
        half: the box half width h (static).

    Returns:
        The dilated mask, same shape and dtype; pixels outside the array count as 0.
    """
    if half <= 0:
        return mask
    out = mask
    for axis in axis_order:
        window = [1, 1]
        window[axis] = 2 * half + 1
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        out = lax.reduce_window(out, jnp.array(0, out.dtype), lax.bitwise_or, tuple(window), (1, 1), pad)
    return out
