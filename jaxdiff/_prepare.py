"""Preparation before the fit: mask-plane bookkeeping (ALGORITHM §4.2) and padded cut-outs (§1)."""

import jax.numpy as jnp
from jax import lax

from ._mask import PlaneTable, add_planes, bitmask, plane_bit


def output_planes(science_planes: PlaneTable, template_planes: PlaneTable, cfg) -> PlaneTable:
    """The plane table of the difference: the science's, plus EDGE, the preserved template planes,
    `<plane>_TEMPLATE` for renamed template planes, and INJECTED/INJECTED_TEMPLATE when FAKE exists."""
    names = ["EDGE", "NO_DATA"]
    names += [p for p in cfg.preserve_template_mask if plane_bit(template_planes, p) is not None]
    names += [f"{p}_TEMPLATE" for p in cfg.rename_template_mask if plane_bit(template_planes, p) is not None]
    if plane_bit(science_planes, "FAKE") is not None:
        names.append("INJECTED")
    if plane_bit(template_planes, "FAKE") is not None:
        names.append("INJECTED_TEMPLATE")
    return add_planes(science_planes, names)


def _move(mask, src: PlaneTable, src_name: str, dst: PlaneTable, dst_name: str):
    sb = plane_bit(src, src_name)
    db = plane_bit(dst, dst_name)
    if sb is None or db is None:
        return jnp.zeros_like(mask)
    return ((mask >> sb) & 1) << db


def prepare_science_mask(mask, planes: PlaneTable, out: PlaneTable):
    """Science mask in the output table: DETECTED* cleared, FAKE copied to INJECTED."""
    res = jnp.zeros_like(mask)
    for name, _ in planes:
        if name in ("DETECTED", "DETECTED_NEGATIVE"):
            continue
        res = res | _move(mask, planes, name, out, name)
    return res | _move(mask, planes, "FAKE", out, "INJECTED")


def prepare_template_mask(mask, planes: PlaneTable, out: PlaneTable, cfg):
    """Template mask in the output table: renamed planes to `<plane>_TEMPLATE`, FAKE to
    INJECTED_TEMPLATE, preserved planes kept by name, everything else cleared."""
    res = jnp.zeros_like(mask)
    for name in cfg.rename_template_mask:
        res = res | _move(mask, planes, name, out, f"{name}_TEMPLATE")
    for name in cfg.preserve_template_mask:
        res = res | _move(mask, planes, name, out, name)
    for name, _ in planes:
        if name.endswith("_TEMPLATE"):
            res = res | _move(mask, planes, name, out, name)
    return res | _move(mask, planes, "FAKE", out, "INJECTED_TEMPLATE")


def exclusion_bits(out: PlaneTable, cfg) -> int:
    """Bits that reject a stamp pixel; SAT_TEMPLATE counts as SAT (jaxdiff)."""
    names = list(cfg.exclude_mask_planes)
    if "SAT" in names:
        names.append("SAT_TEMPLATE")
    return bitmask(out, names)


def padded_cut(planes, offset, half: int, shape: tuple[int, int], fill):
    """Pad each plane by `half`, then read a (ny + 2h, nx + 2h) window starting at `offset`.

    Arguments:
        planes: arrays of one shape (the template's image, variance, mask, inside flag).
        offset: (dy, dx) of the science box origin in the unpadded plane (traced int).
        half: h (static). shape: science (ny, nx) (static). fill: pad value of each plane.

    Returns:
        The cut-outs; element [h, h] is the science pixel [0, 0]. `lax.dynamic_slice` clamps its
        start, so the pad guarantees the window never shifts (ALGORITHM §1).
    """
    ny, nx = shape
    out = []
    for plane, value in zip(planes, fill, strict=True):
        p = jnp.pad(plane, half, constant_values=value)
        out.append(lax.dynamic_slice(p, (offset[0], offset[1]), (ny + 2 * half, nx + 2 * half)))
    return out
