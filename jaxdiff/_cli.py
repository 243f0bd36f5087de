"""The `jaxdiff` command line: `jaxdiff subtract` and `jaxdiff demo` (parsing, I/O and printing only).

Every failure ends with one line on stderr, ``jaxdiff: error: ...``, and a non-zero exit status: 2 for
usage errors (bad options), 1 for data and processing errors. Outputs are written only after the
subtraction succeeded, each atomically, so a failed run leaves no partial file behind.
"""

import argparse
import math
import os
import sys
import time
import traceback
import warnings

import jax
import numpy as np

_PROG = "jaxdiff"
_MODES = ("auto", "convolveTemplate", "convolveScience")
_SOLVERS = ("lstsq", "optax")
_PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
_DEMO_STAR_DENSITY = 300 / 512**2  # stars per pixel: 300 on 512 × 512, a moderately crowded field
_DEMO_TRANSIENT_DENSITY = 12 / 512**2
_DEMO_FLUX_SCALE = 1.2  # science/template photometric scale: the kernel sum to recover
_DETECT_SNR = 5.0  # transients: matched-filter peaks above 5σ in the difference
_MATCH_RADIUS = 2.0  # pixels between an injected transient and its detection


class _Failure(Exception):
    """A data or processing error: reported as one line, exit status 1."""


class _UsageError(Exception):
    """A command-line usage error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) raised as `_UsageError` instead of exiting."""

    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Alard-Lupton PSF-matched image subtraction in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub = commands.add_parser(
        "subtract",
        help="subtract a template from a science image",
        description="PSF-match TEMPLATE to SCIENCE (or the reverse), subtract and decorrelate; write the "
        "difference as LSST-layout multi-extension FITS.",
    )
    sub.add_argument("science", metavar="SCIENCE", help="science exposure (FITS)")
    sub.add_argument("template", metavar="TEMPLATE", help="template exposure (FITS) covering the science box")
    sub.add_argument("-o", "--output", required=True, metavar="DIFF.fits", help="difference image to write")
    sub.add_argument(
        "--sources",
        metavar="TABLE",
        help="kernel stars: any astropy-readable table (FITS, ECSV, CSV) with x,y or "
        "slot_Centroid_x/slot_Centroid_y columns (parent pixels); default: found on the science image",
    )
    sub.add_argument("--mode", choices=_MODES, default=None, help="which image to convolve (default: auto)")
    sub.add_argument(
        "--solver", choices=_SOLVERS, default=None, help="kernel solver: closed form or optax (default: lstsq)"
    )
    sub.add_argument(
        "--config",
        metavar="FILE",
        help="SubtractConfig fields from a TOML or YAML mapping (field = value); options given here override it",
    )
    sub.add_argument(
        "--align",
        action="store_true",
        help="resample the template onto the science image's WCS first (reproject; both need a celestial WCS)",
    )
    for role in ("science", "template"):
        sub.add_argument(
            f"--{role}-psf",
            metavar="PSF",
            help=f"{role} PSF: a FWHM in pixels or a PSF FITS image (default: the file's PSF HDU, else measured "
            "on the image's bright isolated stars)",
        )
        sub.add_argument(
            f"--{role}-gain",
            type=float,
            metavar="E_PER_ADU",
            help=f"{role} gain: the variance becomes max(image, 0)/gain + (read noise/gain)^2 (sources' Poisson "
            "noise included; the image must not be sky-subtracted)",
        )
        sub.add_argument(
            f"--{role}-read-noise", type=float, default=0.0, metavar="E", help=f"{role} read noise in electrons"
        )
        sub.add_argument(
            f"--{role}-saturation", type=float, metavar="ADU", help=f"{role} pixels at or above this are SAT"
        )
        sub.add_argument(
            f"--{role}-valid",
            type=float,
            nargs=2,
            metavar=("LO", "HI"),
            help=f"{role} pixels outside [LO, HI] are NO_DATA",
        )
        sub.add_argument(
            f"--{role}-mask", metavar="MASK.fits", help=f"{role} mask image (FITS): non-zero pixels are BAD"
        )
    sub.add_argument("--no-decorrelate", action="store_true", help="skip the decorrelation afterburner")
    sub.add_argument(
        "--subtract-background",
        action="store_true",
        help="also subtract the fitted differential background (by default it is fitted but kept, as in LSST)",
    )
    sub.add_argument("--plot", metavar="DIAG.png", help="also write a diagnostic figure")
    sub.add_argument(
        "--precompile",
        action="store_true",
        help="afterwards also compile the programs of the other kernel sizes, so that later runs on images of "
        "this size do not compile whatever their PSF widths (once per installation; see docs/compile-once.md)",
    )
    sub.add_argument("--matched-template", metavar="PATH", help="also write the PSF-matched template (FITS)")
    sub.add_argument("-v", "--verbose", action="store_true", help="print all metadata; tracebacks on errors")

    demo = commands.add_parser(
        "demo",
        help="simulate a pair with transients, subtract it and report what was found",
        description="Simulate a science/template pair with injected transients, subtract it, write FITS "
        "files and a diagnostic figure, and report how many transients the difference recovers.",
    )
    demo.add_argument("--size", type=_size, default=1024, metavar="N", help="image side in pixels (default 1024)")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    demo.add_argument("--outdir", default="demo_output", metavar="DIR", help="output directory (default demo_output)")
    demo.add_argument("--no-plot", action="store_true", help="do not write diagnostics.png")
    demo.add_argument("-v", "--verbose", action="store_true", help="print all metadata; tracebacks on errors")
    return parser


def _size(text: str) -> int:
    value = int(text)
    if value < 128:
        raise argparse.ArgumentTypeError(f"must be at least 128, got {value}")
    return value


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    del filename, lineno, line
    print(f"{_PROG}: warning: {_one_line(message)} ({category.__name__})", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `jaxdiff` command line.

    Arguments:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 on success, 1 for data or processing errors, 2 for usage errors.
    """
    verbose = False
    with warnings.catch_warnings():
        # warnings as single lines, so that a failed run still ends with exactly one error line
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            args = _build_parser().parse_args(argv)
            verbose = args.verbose
            with jax.enable_x64(True):
                return _subtract(args) if args.command == "subtract" else _demo(args)
        except _UsageError as err:
            print(f"{_PROG}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except SystemExit as err:  # --help and --version exit through argparse
            return int(err.code or 0)
        except KeyboardInterrupt:
            print(f"{_PROG}: error: interrupted", file=sys.stderr)
            return 130
        except (_Failure, ValueError, RuntimeError, OSError) as err:
            if verbose:
                traceback.print_exc()
            print(f"{_PROG}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        except Exception as err:  # noqa: BLE001 - the CLI never shows a traceback unless asked (-v)
            if verbose:
                traceback.print_exc()
            hint = "" if verbose else " (rerun with -v for the traceback)"
            print(f"{_PROG}: error: unexpected {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
            return 1


def _check_output(path: str, what: str) -> None:
    """Fail early when an output cannot be written: a directory, or a missing parent directory."""
    if os.path.isdir(path):
        raise _Failure(f"{what} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise _Failure(f"cannot write the {what} {path}: directory {parent} does not exist")


def _read_image(path: str, what: str, args=None):
    from ._inputs import with_options
    from ._io import read_exposure

    try:
        exposure = read_exposure(path)
    except (FileNotFoundError, ValueError) as err:
        raise _Failure(f"cannot read the {what} image: {err}") from err
    if not np.any(np.isfinite(np.asarray(exposure.image))):
        raise _Failure(f"the {what} image {path} has no finite pixels (all NaN or infinite)")
    if args is None:
        return exposure
    opt = {key: getattr(args, f"{what}_{key}") for key in ("psf", "gain", "read_noise", "saturation", "valid", "mask")}
    mask = None if opt["mask"] is None else _read_mask(opt["mask"], what)
    valid = opt["valid"] or (None, None)
    try:
        return with_options(
            exposure,
            name=f"{what} image {path}",
            psf=opt["psf"],
            gain=opt["gain"],
            read_noise=opt["read_noise"],
            saturation=opt["saturation"],
            valid_min=valid[0],
            valid_max=valid[1],
            mask=mask,
        )
    except ValueError as err:
        raise _Failure(str(err)) from err


def _read_mask(path: str, what: str):
    from astropy.io import fits

    if not os.path.isfile(path):
        raise _Failure(f"cannot read the {what} mask {path}: no such file")
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
            if hdu is None:
                raise _Failure(f"the {what} mask {path} holds no image")
            return np.asarray(hdu.data)
    except OSError as err:
        raise _Failure(f"cannot read the {what} mask {path}: {err}") from err


def _read_table(path: str):
    from astropy.io.registry import IORegistryError
    from astropy.table import Table

    if not os.path.isfile(path):
        raise _Failure(f"cannot read the source table {path}: no such file")
    errors = (IORegistryError, OSError, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError)
    try:
        return Table.read(path)
    except IORegistryError:
        pass  # no format known from the name: try the ASCII readers (CSV, whitespace, ECSV)
    except errors as err:
        raise _Failure(f"cannot read the source table {path}: {err}") from err
    try:
        return Table.read(path, format="ascii")
    except errors as err:
        raise _Failure(
            f"cannot read the source table {path}: not a table astropy can read (FITS, ECSV, CSV, ...): {err}"
        ) from err


def _read_sources(path: str, science):
    """Sources from a table file; fails unless at least one row lies inside the science box."""
    from ._sources import Sources

    table = _read_table(path)
    if len(table) == 0:
        raise _Failure(f"the source table {path} is empty")
    try:
        sources = Sources.from_table(table)
    except ValueError as err:
        raise _Failure(f"unusable source table {path}: {err}") from err
    x, y, valid = (np.asarray(a) for a in jax.device_get((sources.x, sources.y, sources.valid)))
    x0, y0, x1, y1 = science.bbox
    inside = valid & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    if not inside.any():
        raise _Failure(
            f"unusable source table {path}: none of its {len(table)} rows has a finite position inside the "
            f"science image (x {x0}..{x1}, y {y0}..{y1}, parent pixels)"
        )
    return sources


def _solver(name: str):
    from .solvers import LeastSquares, OptaxSolver

    return LeastSquares() if name == "lstsq" else OptaxSolver()


def _subtract(args) -> int:
    from ._config import SubtractConfig
    from ._io import write_exposure
    from ._plot import diagnostic_figure, save_figure
    from ._task import AlardLuptonSubtract

    if args.plot is not None and os.path.splitext(args.plot)[1].lower() not in _PLOT_FORMATS:
        raise _UsageError(f"argument --plot: {args.plot!r} has no supported extension ({', '.join(_PLOT_FORMATS)})")
    outputs = [(args.output, "output")]
    if args.matched_template:
        outputs.append((args.matched_template, "matched template"))
    if args.plot:
        outputs.append((args.plot, "plot"))
    for path, what in outputs:
        _check_output(path, what)
    t0 = time.perf_counter()
    science = _read_image(args.science, "science", args)
    template = _read_image(args.template, "template", args)
    if args.align:
        from ._align import align_template

        try:
            template = align_template(template, science)
        except ValueError as err:
            raise _Failure(f"cannot align the template {args.template}: {err}") from err
    sources = None if args.sources is None else _read_sources(args.sources, science)
    config = SubtractConfig(mode="auto")
    if args.config is not None:
        from ._inputs import config_from_file

        config = config_from_file(args.config, config)
    overrides = {}
    if args.mode is not None:
        overrides["mode"] = args.mode
    if args.solver is not None:
        overrides["solver"] = _solver(args.solver)
    if args.no_decorrelate:
        overrides["do_decorrelation"] = False
    if args.subtract_background:
        overrides["do_subtract_background"] = True
    config = config.replace(**overrides) if overrides else config
    task = AlardLuptonSubtract(config)
    result = task.run(template, science, sources)
    # everything that can fail on the data happens before the first file is written
    figure = None if args.plot is None else diagnostic_figure(science, template, result)
    write_exposure(args.output, result.difference)
    if args.matched_template:
        write_exposure(args.matched_template, result.matched_template)
    if figure is not None:
        save_figure(figure, args.plot)
    wall = time.perf_counter() - t0

    md = result.metadata
    ny, nx = science.shape
    print(f"{_PROG}: wrote {args.output} ({nx}×{ny} difference)")
    print(f"  mode          {md['mode']} ({'' if config.do_decorrelation else 'not '}decorrelated)")
    print(f"  kernel stars  {md['n_stamps_used']} of {md['n_stamps']} stamps used")
    print(f"  kernel sum    {md['kernel_sum']:.5f}")
    print(f"  residuals     mean {md['residual_mean']:+.3f}, std {md['residual_std']:.3f} (stamp pixels / σ)")
    print(f"  coverage      {100 * md['template_coverage']:.1f} % of the science pixels")
    print(f"  time          {md['timing.total']:.2f} s subtraction (JAX compilation included), {wall:.2f} s in all")
    for path in (args.matched_template, args.plot):
        if path:
            print(f"  also wrote    {path}")
    if args.verbose:
        for key, value in md.items():
            print(f"  {key} = {value}")
    if args.precompile:
        done = int(md["kernel_size"])
        print(f"{_PROG}: compiling the programs of the other kernel sides (this one's, {done} px, is compiled)")
        task.precompile(
            template,
            science,
            sources,
            lambda side, s: print(f"  kernel side {side} px: {s:.1f} s", flush=True),
            result=result,
        )
    return 0


def _detections(difference):
    """Matched-filter peaks of the difference above 5σ: (x, y, PSF flux) in parent pixels."""
    from ._config import SubtractConfig
    from ._detect import detect_sources
    from ._mask import bitmask

    bad = bitmask(difference.mask_planes, SubtractConfig().bad_mask_planes)
    found = detect_sources(difference, bad, (_DETECT_SNR, math.inf))
    x, y, flux, valid = (np.asarray(a) for a in jax.device_get((found.x, found.y, found.flux, found.valid)))
    return x[valid], y[valid], flux[valid]  # detect_sources pads its list with invalid entries


def _match(truth_x, truth_y, x, y, radius: float):
    """For each injected transient the index of the nearest detection within `radius` (−1: none)."""
    if x.size == 0:
        return np.full(truth_x.shape, -1)
    d2 = (truth_x[:, None] - x[None, :]) ** 2 + (truth_y[:, None] - y[None, :]) ** 2
    nearest = np.argmin(d2, axis=1)
    return np.where(d2[np.arange(truth_x.size), nearest] <= radius**2, nearest, -1)


def _demo(args) -> int:
    from ._io import write_exposure
    from ._plot import diagnostic_figure
    from ._sim import simulate_pair
    from ._task import AlardLuptonSubtract

    n = args.size
    n_stars = round(_DEMO_STAR_DENSITY * n * n)
    n_transients = max(5, round(_DEMO_TRANSIENT_DENSITY * n * n))
    os.makedirs(args.outdir, exist_ok=True)

    def say(text):
        print(text, flush=True)

    say(
        f"simulating a {n}×{n} pair: {n_stars} stars, {n_transients} transients, PSF σ 2.0 px (template) "
        f"and 2.4 px (science), science flux scale {_DEMO_FLUX_SCALE}, seed {args.seed} …"
    )
    t = time.perf_counter()
    pair = simulate_pair(
        (n, n),
        seed=args.seed,
        n_stars=n_stars,
        n_transients=n_transients,
        flux_scale=_DEMO_FLUX_SCALE,
        shift=(0.3, -0.2),
        template_border=8,
    )
    say(f"  done in {time.perf_counter() - t:.2f} s")

    task = AlardLuptonSubtract(mode="auto", do_subtract_background=True)
    say(
        "subtracting (mode auto, kernel stars found on the science image, differential sky subtracted; "
        "the first call compiles) …"
    )
    t = time.perf_counter()
    result = task.run(pair.template, pair.science, None)
    first = time.perf_counter() - t
    say(f"  done in {first:.2f} s; again, now compiled …")
    t = time.perf_counter()
    result = task.run(pair.template, pair.science, None)
    second = time.perf_counter() - t
    say(f"  done in {second:.2f} s")

    say(f"writing {args.outdir}/ …")
    files = {
        "science.fits": pair.science,
        "template.fits": pair.template,
        "difference.fits": result.difference,
    }
    for name, exposure in files.items():
        write_exposure(os.path.join(args.outdir, name), exposure)
    if not args.no_plot:
        diagnostic_figure(
            pair.science, pair.template, result, os.path.join(args.outdir, "diagnostics.png"), truth=pair.truth
        )
        files["diagnostics.png"] = None

    md = result.metadata
    truth = pair.truth
    expected_sum = truth.flux_scale if md["mode"] == "convolveTemplate" else 1.0 / truth.flux_scale
    x, y, flux = _detections(result.difference)
    match = _match(truth.transients_x, truth.transients_y, x, y, _MATCH_RADIUS)
    found = match >= 0
    others = x.size - np.unique(match[found]).size
    ratio = flux[match[found]] / truth.transients_flux[found]

    say("results")
    say(f"  mode               {md['mode']} (science PSF is the wider one)")
    say(f"  kernel stamps      {md['n_stamps_used']} used of {md['n_stamps']} candidates")
    say(f"  kernel sum         {md['kernel_sum']:.4f} (true flux scale {expected_sum:.4f})")
    say(f"  stamp residuals    mean {md['residual_mean']:+.3f}, std {md['residual_std']:.3f} (units of σ)")
    say(f"  time               {first:.2f} s with compilation, {second:.2f} s compiled")
    say(
        f"  transients         recovered {int(found.sum())}/{truth.transients_x.size} at S/N > {_DETECT_SNR:g} "
        f"within {_MATCH_RADIUS:g} px"
        + (f"; median measured/true PSF flux {np.median(ratio):.3f}" if ratio.size else "")
    )
    say(f"  other detections   {others} (residuals of stars or noise peaks above {_DETECT_SNR:g}σ)")
    say(f"  files              {', '.join(os.path.join(args.outdir, f) for f in files)}")
    if args.verbose:
        for key, value in md.items():
            say(f"  {key} = {value}")
    return 0
