"""The static plan of a subtraction (ALGORITHM §2): the few decisions that fix array shapes.

Only shapes and program structure are static. Everything that follows from the data — PSF widths, basis
widths, the resolved mode under `mode="auto"`, which sources are usable — is computed inside the compiled
program, so a new pair reuses the program of the last pair of the same image size. What remains static is
chosen from small fixed sets:

- the kernel side `k`: the size ip_diffim would use (6 × the largest basis width, clamped to
  [kernel_size_min, kernel_size_max]) moved to the nearest of `config.kernel_size_buckets` (ties go up);
- the source capacity: source lists are padded to a multiple of `SOURCE_CAPACITY` (1024, above LSST's
  1000 kernel stars), and the fit has that many stamp slots (capped by `max_kernel_sources`, rounded up to a
  multiple of 128). The fit runs over the slots in chunks of `stamps.CHUNK` (64) and skips chunks without a star
  (`stamps.over_slots`), so its cost follows the star count while the star count is not a shape. Under
  `vmap` the skipped chunks run anyway, so a plan for a batch (`make_plan` on stacked pairs,
  `batch.plan_for_pairs`) takes only the next of `SLOT_SIZES` (128, 256, 512, 1024) above the valid count;
- the PSF image side: image PSFs are zero-padded to the next of `PSF_SIZES` (the moments, the detection filter
  and the decorrelated difference PSF do not change under zero padding).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import basis as _basis
from ._config import SubtractConfig, check_mode
from ._exposure import Exposure
from ._image_fit import resolve_fit_region
from ._mask import bitmask
from ._psf import GaussianPsf, GridPsf, ImagePsf, Psf, host_sigma_xy
from ._runtime import helper_pool
from ._sources import Sources, capacity_for
from ._stats import usable
from ._types import is_concrete

SLOT_SIZES = (128, 256, 512, 1024)  # stamp slots of the fit, then multiples of 1024
PSF_SIZES = (41, 65, 101, 161)
PRECONVOLUTION_WIDTH = math.sqrt(2.0)  # the score image's PSF is P ∗ P: √2 × the science PSF width (§12)


class PlanError(ValueError):
    """A traced call needs a static decision it cannot take from traced values: pass a plan."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static decisions taken before tracing; they fix every shape of the compiled program.

    Attributes:
        mode: "convolveTemplate", "convolveScience", or "auto" (decided inside the program from the PSF widths).
        k: kernel side (odd), one of `config.kernel_size_buckets` (or `config.kernel_size`).
        n_slots: stamp slots of the fit: a multiple of 128 (whole chunks of `stamps.CHUNK`), 1024 with the default
            config.
        capacity: length the source list is padded to.
        psf_size: side image PSFs are padded to (None: PSFs are used as given).
        fit_region: "stamps" or "image" (the kernel fitted on the whole overlap, `_image_fit`).
    """

    mode: str
    k: int
    n_slots: int
    capacity: int
    psf_size: int | None = None
    fit_region: str = "stamps"


def facts(template: Exposure, science: Exposure, data: bool = True) -> dict:
    """What the shell checks before the core, computed on the host (numpy): no compiled program per image size.

    Returns Python values: PSF widths (σx, σy) of both images (None without a PSF), template coverage (§3),
    and with `data` those of `data_facts`.
    """
    t_psf, s_psf = template.psf, science.psf
    # the coverage count (a pass over both masks, without the GIL) runs on a helper thread beside the widths
    covered = helper_pool().submit(coverage, template, science, np)
    res = {}
    if t_psf is not None or s_psf is not None:
        wt, ws = (_widths(p, False) for p in (t_psf, s_psf))
        for name, w, psf in (("template", wt, t_psf), ("science", ws, s_psf)):
            res[f"{name}_widths"] = _checked_widths(w, psf, name)[0]
    else:
        res.update(template_widths=None, science_widths=None)
    res["coverage"] = float(covered.result())
    return res | data_facts(template, science) if data else res


def data_facts(template: Exposure, science: Exposure) -> dict:
    """Whether each image has a usable pixel and how many of its pixels have an invalid variance (host).

    Valid data is the common case and is recognised in one pass without image-sized temporaries
    (`_all_valid_variance`), and the search for a usable pixel stops at the first block of rows that holds one.
    Only other data pays the full pixel-wise count.
    """
    res = {}
    for name, e in (("template", template), ("science", science)):
        image, variance = np.asarray(e.image), np.asarray(e.variance)
        res[f"{name}_usable"] = _any_usable(image, variance)
        if _all_valid_variance(variance):
            res[f"{name}_bad_variance"] = 0
        else:
            bad = np.isfinite(image) & ~(np.isfinite(variance) & (variance >= 0))  # finite pixel, invalid variance
            res[f"{name}_bad_variance"] = int(np.count_nonzero(bad))
    return res


def _all_valid_variance(variance: np.ndarray) -> bool:
    """True when every variance is finite and ≥ 0 (False may still be valid data: the caller counts then).

    A non-negative float is finite exactly when its bits, read as an unsigned integer, are below those of +inf
    (NaN and −inf lie above, and so does −0.0, which the count then accepts): one maximum over the plane,
    instead of a minimum and a maximum."""
    if not variance.size:
        return False
    if variance.dtype.kind == "f" and variance.dtype.itemsize in (2, 4, 8):
        unsigned = np.dtype(variance.dtype.str.replace("f", "u"))  # same width and byte order
        return bool(np.max(variance.view(unsigned)) < np.array(np.inf, variance.dtype).view(unsigned))
    return bool(np.min(variance) >= 0 and np.isfinite(np.max(variance)))


def _any_usable(image: np.ndarray, variance: np.ndarray, rows: int = 64) -> bool:
    """`np.any(usable(image, variance))`, block of rows by block of rows, stopping at the first usable pixel."""
    return any(np.any(usable(image[r : r + rows], variance[r : r + rows], np)) for r in range(0, image.shape[0], rows))


def _widths(psf: Psf | None, batched: bool):
    """(σx, σy) from adaptive moments on the host, shape (2,) or (B, 2) for a stacked batch; NaN without a
    PSF."""
    return np.full(2, np.nan) if psf is None else host_sigma_xy(psf, batched)


def _checked_widths(w, psf, name: str) -> list:
    """Host widths as a list of (σx, σy) tuples (one per pair), or [None] without a PSF."""
    if psf is None:
        return [None]
    w = np.asarray(w, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"the {name} PSF width cannot be measured at its centre (adaptive moments failed)")
    return [(float(a), float(b)) for a, b in w]


def coverage(template: Exposure, science: Exposure, xp=jnp):
    """Fraction of science pixels with data in both images: NO_DATA set in neither mask (ALGORITHM §3).

    Template pixels outside the template's array count as lacking data. With `xp=jnp` traceable (xy0 may be
    traced); with `xp=np` computed on the host (the task's pre-check).
    """
    ny, nx = science.shape
    nd_t = bitmask(template.mask_planes, ["NO_DATA"])
    nd_s = bitmask(science.mask_planes, ["NO_DATA"])
    if xp is np:
        return _host_coverage(template, science, nd_t, nd_s)
    dy = science.xy0[1] - template.xy0[1]
    dx = science.xy0[0] - template.xy0[0]
    ty, tx = template.shape
    s_lacks = (science.mask & nd_s) != 0

    def fraction(lacks):
        return 1.0 - jnp.mean(lacks.astype(jnp.float32))

    def gathered():  # any overlap: the template's rows and columns gathered, those beyond it lacking data
        rows = jnp.arange(ny) + dy
        cols = jnp.arange(nx) + dx
        inside = ((rows >= 0) & (rows < ty))[:, None] & ((cols >= 0) & (cols < tx))[None, :]
        t_mask = template.mask[jnp.clip(rows, 0, ty - 1)][:, jnp.clip(cols, 0, tx - 1)]
        return fraction(~inside | ((t_mask & nd_t) != 0) | s_lacks)

    if ty < ny or tx < nx:
        return gathered()

    # the template's box contains the science box (as the task requires): a slice, no gather. The slice is
    # always in bounds (its start is clamped) and counted outside the `cond`, whose operands would be copied
    t_mask = lax.dynamic_slice(template.mask, (dy, dx), (ny, nx))
    in_box = fraction(((t_mask & nd_t) != 0) | s_lacks)
    contained = (dy >= 0) & (dy <= ty - ny) & (dx >= 0) & (dx <= tx - nx)
    return lax.cond(contained, lambda: in_box, gathered)


def _host_coverage(template: Exposure, science: Exposure, nd_t: int, nd_s: int) -> np.float32:
    """`coverage` on the host: the template's overlap with the science box is a slice (no gather); the count is
    exact, the fraction a float32 as the traced version's."""
    ny, nx = science.shape
    ty, tx = template.shape
    dx, dy = (int(a) - int(b) for a, b in zip(np.asarray(science.xy0), np.asarray(template.xy0), strict=True))
    r0, r1 = max(0, -dy), min(ny, ty - dy)  # science rows (and columns) the template's array reaches
    c0, c1 = max(0, -dx), min(nx, tx - dx)
    has = 0
    if r1 > r0 and c1 > c0:
        t_mask = np.asarray(template.mask)[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
        s_mask = np.asarray(science.mask)[r0:r1, c0:c1]
        if not (
            int(np.bitwise_or.reduce(t_mask, axis=None)) & nd_t or int(np.bitwise_or.reduce(s_mask, axis=None)) & nd_s
        ):
            has = (r1 - r0) * (c1 - c0)  # NO_DATA set nowhere in the overlap (one pass per mask, no temporaries)
        else:
            has = int(np.count_nonzero(((t_mask & nd_t) == 0) & ((s_mask & nd_s) == 0)))
    return np.float32(1.0) - np.float32(ny * nx - has) / np.float32(ny * nx)


def resolve_mode(mode: str, w_template, w_science) -> str:
    """`auto` → convolve the template iff σx(T) ≤ σx(S) or σy(T) ≤ σy(S) (concrete widths; §2)."""
    check_mode(mode)
    if mode != "auto":
        return mode
    if w_template is None or w_science is None:
        return "convolveTemplate"
    (tx, ty), (sx, sy) = w_template, w_science
    return "convolveTemplate" if (tx <= sx or ty <= sy) else "convolveScience"


def convolves_template(mode: str, w_template, w_science):
    """The mode decision as a boolean: a Python bool for a fixed mode, a traced one for `auto` (§2).

    Arguments:
        mode: the plan's mode.
        w_template, w_science: (σx, σy) arrays of the two PSFs (may be traced), or None without a PSF.
    """
    if mode != "auto":
        return mode == "convolveTemplate"
    if w_template is None or w_science is None:
        return True
    return (w_template[0] <= w_science[0]) | (w_template[1] <= w_science[1])


def kernel_size_for(config: SubtractConfig, w_template, w_science, mode: str) -> int:
    """The kernel side for concrete widths: ip_diffim's FWHM rule, then the nearest bucket (§5.1).

    With `mode="auto"` the larger of the two modes' sizes is used, so the program serves both outcomes.
    """
    if config.kernel_basis != "alard-lupton" or not config.scale_by_fwhm or w_template is None or w_science is None:
        return config.kernel_size
    st = math.sqrt(0.5 * (w_template[0] ** 2 + w_template[1] ** 2))
    ss = math.sqrt(0.5 * (w_science[0] ** 2 + w_science[1] ** 2))
    if config.use_preconvolution:
        ss *= PRECONVOLUTION_WIDTH
    orders = {"convolveTemplate": [(st, ss)], "convolveScience": [(ss, st)], "auto": [(st, ss), (ss, st)]}[mode]
    sizes = []
    for sx, sy in orders:
        widths, _ = _basis.alard_lupton_widths(sx, sy, **width_kwargs(config))
        sizes.append(
            _basis.kernel_size(
                np.asarray(widths),
                fwhm_scaling=config.kernel_size_fwhm_scaling,
                size_min=config.kernel_size_min,
                size_max=config.kernel_size_max,
            )
        )
    return nearest_bucket(max(sizes), config.kernel_size_buckets)


def nearest_bucket(value: int, sizes) -> int:
    """The one of `sizes` nearest to `value` (the larger on a tie), or `value` when `sizes` is empty.

    The FWHM rule's kernel half-width is 6 widest basis widths, about 12 kernel σ; moving it by a pixel or
    two to a bucket costs the kernel nothing, while rounding always up makes stamps larger, and on small images
    fewer of them fit (a 400² preconvolution pair: rule 29 → 35 left 6 stamps and a score std 15 % high;
    29 → 27 keeps 10 and the std within 4 %).
    """
    sizes = sorted(int(s) for s in sizes)
    if not sizes:
        return int(value)
    return min(sizes, key=lambda s: (abs(s - value), -s))


def bucket(value: int, sizes) -> int:
    """The smallest of `sizes` at least `value` (the largest when none is), or `value` when `sizes` is empty."""
    sizes = sorted(int(s) for s in sizes)
    if not sizes:
        return int(value)
    return next((s for s in sizes if s >= value), sizes[-1])


def width_kwargs(config: SubtractConfig) -> dict:
    """The Alard–Lupton width options of `config` as keywords of `basis.alard_lupton_widths`."""
    return dict(
        sig_gauss=tuple(config.al_sig_gauss),
        beta=config.al_gauss_beta,
        min_sig=config.al_min_sig,
        min_sig_deconv=config.al_min_sig_deconv,
        scale_by_fwhm=config.scale_by_fwhm,
    )


def psf_size_for(template: Exposure, science: Exposure, config: SubtractConfig) -> int | None:
    """The padded PSF side, or None where PSFs stay as given (a missing PSF, or preconvolution, whose inner box
    follows the PSF size)."""
    psfs = (template.psf, science.psf)
    if config.use_preconvolution or any(p is None for p in psfs):
        return None
    size = max(p.size for p in psfs)
    return size if size > PSF_SIZES[-1] else bucket(size, PSF_SIZES)


def canonical_psf(psf: Psf | None, size: int | None) -> Psf | None:
    """The PSF zero-padded to side `size` (unchanged when `size` is None), so that every PSF of a size bucket
    gives the same program: a `GaussianPsf` is drawn at that size, a `GridPsf` keeps its grid with padded node
    images, any other model becomes an `ImagePsf` of its centre image."""
    if size is None or psf is None or psf.size == size:
        return psf
    pad = (size - psf.size) // 2
    if pad < 0:
        raise ValueError(f"PSF image of side {psf.size} is larger than the planned side {size}")
    if isinstance(psf, GaussianPsf):  # drawn inside the program at the new size
        return GaussianPsf(psf.width, size)
    xp = np if is_concrete(psf) else jnp  # on the host when concrete: no program per PSF size
    if isinstance(psf, GridPsf):
        return GridPsf(xp.pad(xp.asarray(psf.images), ((0, 0), (0, 0), (pad, pad), (pad, pad))), psf.box)
    image = psf.array if isinstance(psf, ImagePsf) else psf.image()
    return ImagePsf(xp.pad(xp.asarray(image), pad))


def make_plan(
    template: Exposure, science: Exposure, sources: Sources | None, config: SubtractConfig | None = None
) -> Plan:
    """The static plan for these inputs (ALGORITHM §2); build it once and pass it to `jd.subtract` under
    `jax.jit` / `jax.vmap`, where PSF widths are traced and cannot decide a kernel size.

    Arguments:
        template, science: exposures with concrete PSFs; a stacked batch (leading axis) is allowed: the plan then
            serves every pair, with the largest kernel size any pair needs.
        sources: the kernel candidates (None: detected on the science image).
        config: a `SubtractConfig` (default: LSST's defaults).

    Returns:
        A hashable `Plan`.
    """
    config = SubtractConfig() if config is None else config
    check_mode(config.mode)
    psf_size = psf_size_for(template, science, config)
    batched = science.image.ndim == 3
    widths = None
    if _needs_widths(config) and template.psf is not None and science.psf is not None:
        psfs = [p for p in (template.psf, science.psf) if p is not None]
        if not is_concrete(jax.tree.leaves(psfs)):
            raise PlanError(
                "jd.subtract was called with traced PSFs (under jax.jit, vmap or grad) and no plan: the kernel "
                "size depends on the PSF widths and cannot be chosen from traced values. Build the plan outside "
                "the transformation with jd.make_plan(template, science, sources, config) and pass plan=..."
            )
        t_psf, s_psf = (_canonical(e.psf, psf_size, batched) for e in (template, science))
        wt, ws = (_widths(p, batched) for p in (t_psf, s_psf))
        widths = (_checked_widths(wt, t_psf, "template"), _checked_widths(ws, s_psf, "science"))
    n = 0 if sources is None else int(np.shape(sources.x)[-1])
    plan = plan_from(science.shape, n, config, widths, psf_size)
    if batched and sources is not None and is_concrete(sources.valid):
        # under vmap the skipped chunks of slots run anyway (lax.cond becomes a select): fewer slots for a batch
        plan = with_slots_for(plan, int(np.max(np.sum(np.asarray(sources.valid), axis=-1), initial=0)))
    return plan


def with_slots_for(plan: Plan, n_valid: int) -> Plan:
    """The plan with only as many stamp slots as `n_valid` valid sources need: the next of `SLOT_SIZES` (every
    slot costs the fit a stamp design and residual tests whether or not a star is in it)."""
    return dataclasses.replace(plan, n_slots=min(plan.n_slots, slot_count(n_valid)))


def slot_count(n: int) -> int:
    """The next of `SLOT_SIZES` at least `n`, or the next multiple of 1024 above them."""
    return bucket(n, SLOT_SIZES) if n <= SLOT_SIZES[-1] else -(-int(n) // 1024) * 1024


def plan_from(shape, n_sources: int, config: SubtractConfig, widths, psf_size: int | None) -> Plan:
    """`make_plan` from measured facts: science (ny, nx), source count, and ([template (σx, σy)…],
    [science (σx, σy)…]) per pair (None when a PSF is missing or widths are not used)."""
    mode = "convolveTemplate" if config.use_preconvolution else config.mode
    k = config.kernel_size
    if _needs_widths(config) and widths is not None and None not in widths[0] + widths[1]:
        k = max(kernel_size_for(config, a, b, mode) for a, b in zip(*widths, strict=True))
    side = 2 * int(k) + 1
    fit_region = resolve_fit_region(config, tuple(shape), int(k))
    if fit_region == "stamps" and side > min(shape):
        raise ValueError(
            f"kernel size {int(k)} needs ({side}, {side}) stamps, larger than the science image {tuple(shape)}; "
            "use a smaller kernel_size / kernel_size_max / kernel_size_buckets or a larger image"
        )
    capacity = capacity_for(n_sources)
    wanted = capacity if config.max_kernel_sources < 0 else min(config.max_kernel_sources, capacity)
    n_slots = slot_count(wanted)
    return Plan(mode=mode, k=int(k), n_slots=n_slots, capacity=capacity, psf_size=psf_size, fit_region=fit_region)


def _needs_widths(config: SubtractConfig) -> bool:
    return config.kernel_basis == "alard-lupton" and config.scale_by_fwhm


def _canonical(psf, size, batched: bool):
    if psf is None or size is None:
        return psf
    return eqx.filter_vmap(lambda p: canonical_psf(p, size))(psf) if batched else canonical_psf(psf, size)
