"""Diagnostic figure of a subtraction: images, kernel over the field, normalised residual histogram."""

import math
import os
import uuid

import jax
import numpy as np

from ._exposure import Exposure
from ._mask import bitmask

_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE")
_KERNEL_GRID = 3
_HIST_RANGE = 6.0  # histogram of difference/σ over [-6, 6]
_DIFF_STRETCH = 5.0  # difference shown over ±5 × median σ
# the run panel (about 5 × 4 inches): lines per column at 8 pt and at 6.5 pt; characters across it at each size
_RUN_LINES = (30, 36)
_RUN_CHARS = (70, 86)


def _host(exposure: Exposure):
    """(image, variance, mask, (x0, y0)) as numpy arrays on the host, one transfer."""
    image, variance, mask, xy0 = jax.device_get((exposure.image, exposure.variance, exposure.mask, exposure.xy0))
    return np.asarray(image), np.asarray(variance), np.asarray(mask), tuple(int(v) for v in xy0)


def _limits(image: np.ndarray) -> tuple[float, float]:
    """A 1–99.5 percentile display range of the finite pixels (0, 1 when there are none)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _template_on_science(template: Exposure, science_shape, science_xy0) -> np.ndarray:
    """The template pixels that overlap the science box, NaN where the template does not reach."""
    image, _, _, (tx0, ty0) = _host(template)
    ny, nx = science_shape
    out = np.full((ny, nx), np.nan, np.float64)
    x0, y0 = science_xy0[0] - tx0, science_xy0[1] - ty0
    ys = slice(max(y0, 0), min(y0 + ny, image.shape[0]))
    xs = slice(max(x0, 0), min(x0 + nx, image.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[ys, xs]
    return out


def _normalised_residuals(difference: Exposure) -> np.ndarray:
    """difference/√variance over the good pixels (finite, positive variance, no bad mask plane), flat."""
    image, variance, mask, _ = _host(difference)
    bad_bits = bitmask(difference.mask_planes, _BAD_PLANES)
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0) & ((mask & bad_bits) == 0)
    return (image[good] / np.sqrt(variance[good])).astype(np.float64)


def _kernel_positions(shape, xy0) -> list[tuple[float, float]]:
    """A 3 × 3 grid of parent positions over the science box (at 1/6, 1/2, 5/6 of each side), rows first."""
    ny, nx = shape
    fractions = (np.arange(_KERNEL_GRID) + 0.5) / _KERNEL_GRID
    xs = xy0[0] + fractions * (nx - 1)
    ys = xy0[1] + fractions * (ny - 1)
    return [(float(x), float(y)) for y in ys for x in xs]


def save_figure(fig, path) -> None:
    """Save a figure atomically: to a temporary file beside `path`, then moved into place.

    Arguments:
        fig: a matplotlib Figure.
        path: the output file; the format comes from its extension (PNG when it has none).
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    fmt = os.path.splitext(name)[1].lstrip(".").lower() or "png"
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def diagnostic_figure(science: Exposure, template: Exposure, result, path=None, truth=None):
    """A one-page picture of a subtraction.

    Top row: the science image, the template over the science box (1–99.5 percentile stretch) and the
    difference (±5 median σ). Bottom row: the PSF-matching kernel at a 3 × 3 grid of positions over
    the science box (one common colour scale, kernel sum printed in each), the histogram of
    difference/√variance over good pixels (no NO_DATA, BAD, SAT, EDGE) with a unit Gaussian, and the
    run's metadata. Injected transients from `truth` are circled on the science and difference.

    Arguments:
        science: the science exposure.
        template: the template exposure (its part over the science box is shown).
        result: the subtraction result (`difference`, `psf_matching_kernel`, `metadata`).
        path: where to save the figure (format from the extension, PNG by default), written atomically;
            None: not saved.
        truth: optional `jaxdiff.sim.Truth`; its `transients_x`/`transients_y` (parent pixels) are circled.

    Returns:
        The `matplotlib.figure.Figure` (not attached to pyplot).
    """
    from matplotlib.figure import Figure

    difference = result.difference
    sci_image, _, _, sci_xy0 = _host(science)
    diff_image, diff_var, _, diff_xy0 = _host(difference)
    tmpl_image = _template_on_science(template, sci_image.shape, sci_xy0)

    fig = Figure(figsize=(16, 10.5), layout="constrained")
    outer = fig.add_gridspec(2, 3, height_ratios=(1.15, 1.0))

    sigma = float(np.sqrt(np.median(diff_var[np.isfinite(diff_var) & (diff_var > 0)]))) if np.any(diff_var > 0) else 1.0
    panels = (
        ("science", sci_image, _limits(sci_image), "gray", sci_xy0),
        ("template (science box)", tmpl_image, _limits(tmpl_image), "gray", sci_xy0),
        (
            f"difference (±{_DIFF_STRETCH:g}σ, σ = {sigma:.3g})",
            diff_image,
            (-_DIFF_STRETCH * sigma, _DIFF_STRETCH * sigma),
            "RdBu_r",
            diff_xy0,
        ),
    )
    for col, (title, image, (vmin, vmax), cmap, xy0) in enumerate(panels):
        ax = fig.add_subplot(outer[0, col])
        ny, nx = image.shape
        extent = (xy0[0] - 0.5, xy0[0] + nx - 0.5, xy0[1] - 0.5, xy0[1] + ny - 0.5)
        im = ax.imshow(image, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("x (parent pixels)")
        ax.set_ylabel("y")
        fig.colorbar(im, ax=ax, shrink=0.8)
        if truth is not None and col != 1 and len(truth.transients_x):
            ax.scatter(
                truth.transients_x,
                truth.transients_y,
                s=120,
                facecolors="none",
                edgecolors="lime",
                linewidths=1.2,
            )
            ax.set_title(f"{title}; ○ injected transients")

    kernel = result.psf_matching_kernel
    positions = _kernel_positions(sci_image.shape, sci_xy0)
    kernels = np.asarray(jax.device_get([kernel.image(x, y) for x, y in positions]))
    kmax = float(np.max(np.abs(kernels)))
    inner = outer[1, 0].subgridspec(_KERNEL_GRID, _KERNEL_GRID, wspace=0.05, hspace=0.05)
    for i, ((x, y), k) in enumerate(zip(positions, kernels, strict=True)):
        # rows of the grid run from the top of the field down, as in the images above
        ax = fig.add_subplot(inner[_KERNEL_GRID - 1 - i // _KERNEL_GRID, i % _KERNEL_GRID])
        ax.imshow(k, origin="lower", cmap="RdBu_r", vmin=-kmax, vmax=kmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.03, 0.03, f"({x:.0f}, {y:.0f})\nΣ={k.sum():.4f}", transform=ax.transAxes, fontsize=7, va="bottom")
        if i == _KERNEL_GRID * (_KERNEL_GRID - 1) + 1:
            ax.set_title(f"matching kernel {k.shape[1]}×{k.shape[0]} at 3×3 positions")

    ax = fig.add_subplot(outer[1, 1])
    z = _normalised_residuals(difference)
    inside = z[np.abs(z) <= _HIST_RANGE]
    ax.hist(inside, bins=120, range=(-_HIST_RANGE, _HIST_RANGE), density=True, color="0.6", label="pixels")
    grid = np.linspace(-_HIST_RANGE, _HIST_RANGE, 400)
    # scale the unit Gaussian by the fraction of pixels inside the histogram range, so both integrate alike
    weight = inside.size / max(z.size, 1)
    ax.plot(grid, weight * np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi), "k-", label="N(0, 1)")
    if z.size:
        q25, q75 = np.percentile(z, [25.0, 75.0])
        stats = f"mean {np.mean(z):.3f}\nstd {np.std(z):.3f}\nIQR σ {0.7413 * (q75 - q25):.3f}"
        ax.text(0.03, 0.97, stats, transform=ax.transAxes, va="top", fontsize=9)
    ax.set_title(f"difference / √variance ({z.size} good pixels)")
    ax.set_xlabel("σ")
    ax.set_ylabel("density")
    ax.legend(loc="upper right", fontsize=8)

    ax = fig.add_subplot(outer[1, 2])
    ax.axis("off")
    ax.set_title("run")
    # one column at 8 pt while it fits the panel, else columns of smaller type, long values cut
    lines = [f"{key}: {_format(value)}" for key, value in result.metadata.items()]
    columns, size = (1, 8.0) if len(lines) <= _RUN_LINES[0] else (math.ceil(len(lines) / _RUN_LINES[1]), 6.5)
    per_column = math.ceil(len(lines) / columns)
    width = _RUN_CHARS[0] if columns == 1 else _RUN_CHARS[1] // columns - 2
    for c in range(columns):
        text = "\n".join(_shorten(line, width) for line in lines[c * per_column : (c + 1) * per_column])
        label = ax.text(c / columns, 1.0, text, transform=ax.transAxes, va="top", family="monospace", fontsize=size)
        label.set_in_layout(False)  # the panel's size is the grid's; the text must not squeeze the other panels

    if path is not None:
        save_figure(fig, path)
    return fig


def _shorten(line: str, width: int) -> str:
    """A metadata line cut to `width` characters (an ellipsis marks the cut)."""
    return line if len(line) <= width else line[: width - 1] + "…"


def _format(value) -> str:
    """A metadata value for display: floats (also 0-d arrays) to 4 significant digits."""
    if isinstance(value, str | int):
        return str(value)
    arr = np.asarray(jax.device_get(value))
    if arr.ndim == 0 and arr.dtype.kind == "f":
        return f"{float(arr):.4g}"
    return str(arr)
