"""`AlardLuptonSubtract`: the imperative shell around `jd.subtract` (checks, errors, timing, metadata)."""

import dataclasses
import time
import warnings

import equinox as eqx
import jax
import numpy as np

from . import _runtime as runtime
from ._config import SubtractConfig, check_mode
from ._detect import detect_sources
from ._errors import (
    RESULTS,
    InsufficientKernelSourcesError,
    NoKernelCandidatesError,
    NoWorkFound,
    SpatialOrderWarning,
)
from ._existing import subtract_with_kernel
from ._exposure import Exposure
from ._finalize import finalize as _finalize
from ._kernel import SpatialKernel
from ._mask import bitmask
from ._plan import data_facts, facts, plan_from, psf_size_for
from ._psf import as_psf
from ._quality import check_quality, psf_fwhm, quality_figures, start_input_figures
from ._result import SubtractResult
from ._sources import Sources
from ._subtract import core_inputs, restore_wcs, subtract, subtract_staged
from ._types import x64_enabled
from .basis import BASIS_MODES


def _box_str(e: Exposure) -> str:
    x0, y0, x1, y1 = e.bbox
    return f"x {x0}…{x1}, y {y0}…{y1} (shape {e.shape})"


def _wcs_equal(a, b) -> bool:
    if a is None or b is None:
        return True
    try:
        pts = np.array([[0.0, 0.0], [100.0, 50.0], [37.5, 211.0]])
        return bool(np.allclose(a.wcs_pix2world(pts, 0), b.wcs_pix2world(pts, 0), rtol=0, atol=1e-9))
    except Exception:  # noqa: BLE001 - non-celestial or broken WCS: fall back to header equality
        return a.to_header_string() == b.to_header_string()


def validate(template: Exposure, science: Exposure, config: SubtractConfig) -> None:
    """Eager checks, in ALGORITHM §3's order; raises on misuse."""
    check_mode(config.mode)
    for name, e in (("template", template), ("science", science)):
        if not isinstance(e, Exposure):
            raise ValueError(f"{name} must be a jd.Exposure, got {type(e).__name__}")
        if e.image.ndim != 2:
            raise ValueError(f"{name} image must be 2-D, got shape {tuple(e.image.shape)}; use jax.vmap for batches")
    tx0, ty0, tx1, ty1 = template.bbox
    sx0, sy0, sx1, sy1 = science.bbox
    if tx0 > sx0 or ty0 > sy0 or tx1 < sx1 or ty1 < sy1:
        raise ValueError(f"template box {_box_str(template)} does not cover the science box {_box_str(science)}")
    if not _wcs_equal(template.wcs, science.wcs):
        raise ValueError("template and science WCS differ; resample the template onto the science pixel grid first")


class AlardLuptonSubtract(eqx.Module):
    """PSF-matched image subtraction with LSST's `AlardLuptonSubtractTask` behaviour.

    Arguments:
        config: a `SubtractConfig`; its fields may also be given as keywords (they override it).
        staged: run the four stages (prepare, select, fit, difference) as separately compiled programs and report
            each one's wall time under `timing.<stage>` (for attribution; slower and larger than the default,
            the fused `jd.subtract` program, whose stages the profiler shows as named scopes).
    """

    config: SubtractConfig = eqx.field(static=True)
    staged: bool = eqx.field(static=True)

    def __init__(self, config: SubtractConfig | None = None, staged: bool = False, **fields):
        config = SubtractConfig() if config is None else config
        if fields:
            unknown = set(fields) - {f.name for f in dataclasses.fields(SubtractConfig)}
            if unknown:
                raise TypeError(f"unknown SubtractConfig field(s): {', '.join(sorted(unknown))}")
            config = config.replace(**fields)
        self.config = config
        self.staged = bool(staged)

    def run(
        self, template: Exposure, science: Exposure, sources: Sources | None = None, *, science_psf=None
    ) -> SubtractResult:
        """PSF-match, subtract and (unless `do_decorrelation` is False) decorrelate; mode from the config.

        `science_psf`: a `jd.Psf` (or unit-sum odd image) replacing `science.psf` for this call, e.g. a final PSF
        from an external calibration (ip_diffim's `doApplyExternalCalibrations`); jaxdiff exposures carry no
        aperture corrections, so only the PSF is replaced here (the LSST task also swaps those).
        """
        if science_psf is not None:
            science = dataclasses.replace(science, psf=as_psf(science_psf))
        return self._run(template, science, sources, self.config)

    def precompile(
        self,
        template: Exposure,
        science: Exposure,
        sources: Sources | None = None,
        progress=None,
        result: SubtractResult | None = None,
    ) -> dict:
        """Compile, ahead of the data, every kernel size's program for pairs laid out like this one.

        The kernel side follows the PSF widths to one of `config.kernel_size_buckets`, and a new side means a
        new program (several seconds of compilation on a CPU). This runs the task once on the pair, then the
        subtraction once for each other kernel side, so that the persistent cache (and the store of exported
        programs) of `JAXDIFF_CACHE_DIR` holds them all: later processes on images of the same shapes, PSF
        type and mask planes start without compiling, whatever their PSF widths. Run it once per deployment,
        e.g. when a container image or a batch environment is built.

        Arguments:
            template, science: an example pair with the production layout (shapes, PSF kind, mask planes).
            sources: as for `run`; the detection program of `sources=None` is compiled either way.
            progress: optional callable(kernel side, seconds), called as each side is done.
            result: this task's result of `run` on this pair, when it was run already (as `jaxdiff subtract
                --precompile` does): its kernel side is compiled, so only the others are.

        Returns:
            {kernel side: seconds} for each side compiled here (the pair's own side includes the task's run).
        """
        t0 = time.perf_counter()
        ran = result is None
        if ran:
            result = self.run(template, science, sources)
        own = int(result.metadata["kernel_size"])
        seconds = {own: time.perf_counter() - t0} if ran else {}
        if ran and progress is not None:
            progress(own, seconds[own])
        return seconds | self._compile_other_sides(template, science, sources, own, progress)

    def _compile_other_sides(self, template, science, sources, done: int, progress=None) -> dict:
        """Run the subtraction once with each kernel side of `config.kernel_size_buckets` except `done`, as a pair
        whose PSFs call for that side would (the buckets only choose the side): {side: seconds}."""
        cfg = self.config
        seconds = {}
        with jax.enable_x64(True), runtime.single_threaded_blas():
            psf_size, t_in, s_in, found = _checked_inputs(template, science, cfg)
            if science.psf is not None:  # the detection program of sources=None, whatever this call was given
                detected = _kernel_candidates(s_in, cfg)
                sources = detected if sources is None else sources
            widths = ([found["template_widths"]], [found["science_widths"]])
            for side in sorted(set(cfg.kernel_size_buckets) - {done}):
                t1 = time.perf_counter()
                try:
                    plan = plan_from(
                        science.shape, len(sources), cfg.replace(kernel_size_buckets=(side,)), widths, psf_size
                    )
                except ValueError:  # this side does not fit the image: no pair of this size can use it
                    continue
                if plan.k != side:  # the FWHM rule is off (a fixed kernel_size): there is one program
                    break
                jax.block_until_ready(subtract(t_in, s_in, sources.padded(plan.capacity), cfg, plan))
                seconds[side] = time.perf_counter() - t1
                if progress is not None:
                    progress(side, seconds[side])
        return seconds

    def run_with_kernel(
        self,
        template: Exposure,
        science: Exposure,
        kernel: SpatialKernel,
        fit_flux_scale: bool = False,
        sources: Sources | None = None,
    ) -> SubtractResult:
        """Subtract with a given kernel, fitting only the background (and, if `fit_flux_scale`, a flux scale):
        ip_diffim's `SimplifiedSubtractTask` with `useExistingKernel` (see `jaxdiff._existing`). `sources` (found
        on the science image when None) set the footprints of the quality figures and, when given, are kept out
        of the variance estimates as the kernel sources are in `run`."""
        runtime.enter()
        cfg = self.config
        t0 = time.perf_counter()
        with jax.enable_x64(True), runtime.single_threaded_blas():
            psf_size, t_in, s_in, found = _checked_inputs(template, science, cfg)
            result = subtract_with_kernel(template, science, kernel, cfg, fit_flux_scale, sources)
            md = {k: _plain(v) for k, v in jax.device_get(result.metadata).items()}
            if RESULTS(int(md["status"])) != RESULTS.successful:
                raise RuntimeError("the background fit with the given kernel is not finite")
            md.pop("variance_factor_failed")
            mode = "convolveTemplate" if md.pop("convolves_template") else "convolveScience"
            md.pop("basis_mode_code")
            md.update(mode=mode, fit_region="existing_kernel", kernel_size=kernel.size)
            md.update(
                template_psf_fwhm=psf_fwhm(found["template_widths"]), science_psf_fwhm=psf_fwhm(found["science_widths"])
            )
            if sources is None:
                sources = _kernel_candidates(s_in, cfg)
            md.update(self._quality(template, science, result, sources, found, kernel.size))
        md["timing.total"] = time.perf_counter() - t0
        check_quality(md, cfg)
        return _caller_precision(dataclasses.replace(result, metadata=md))

    def _quality(self, template, science, result, sources, found, kernel_size: int, started=None) -> dict:
        """The quality figures of `_quality` (limiting magnitudes, footprint ratio, per-source residuals);
        `started`: the inputs' figures already submitted (`start_input_figures`)."""
        widths = dict(template=found["template_widths"], science=found["science_widths"])
        return quality_figures(
            template,
            science,
            result.difference,
            sources,
            widths,
            kernel_size,
            self.config.detection_snr_range[0],
            started=started,
        )

    def run_convolve_template(self, template, science, sources=None) -> SubtractResult:
        """`run` with the template convolved to match the science PSF."""
        return self._run(template, science, sources, self.config.replace(mode="convolveTemplate"))

    def run_convolve_science(self, template, science, sources=None) -> SubtractResult:
        """`run` with the science convolved to match the template PSF."""
        return self._run(template, science, sources, self.config.replace(mode="convolveScience"))

    def finalize(
        self,
        template: Exposure,
        science: Exposure,
        difference: Exposure,
        kernel: SpatialKernel,
        template_matched: bool = True,
        preconv_mode: bool = False,
        preconv_kernel=None,
        spatially_varying: bool = False,
    ) -> Exposure:
        """Decorrelate a difference image (ALGORITHM §11–12); returns the corrected difference."""
        with jax.enable_x64(True):
            return _finalize(
                template,
                science,
                difference,
                kernel,
                template_matched=template_matched,
                preconv_mode=preconv_mode,
                preconv_kernel=preconv_kernel,
                spatially_varying=spatially_varying,
            )

    def _run(self, template, science, sources, cfg: SubtractConfig) -> SubtractResult:
        try:
            result = self._run_once(template, science, sources, cfg)
        except (InsufficientKernelSourcesError, NoKernelCandidatesError) as err:
            if sources is None or not cfg.allow_kernel_source_detection:
                raise
            # ip_diffim's allowKernelSourceDetection: find kernel candidates on the science image and retry
            result = self._run_once(template, science, None, cfg)
            result.metadata.update(kernel_sources="detected", kernel_sources_error=str(err))
            return result
        result.metadata["kernel_sources"] = "detected" if sources is None else "given"
        return result

    def _run_once(self, template, science, sources, cfg: SubtractConfig) -> SubtractResult:
        runtime.enter()
        timing = {}
        t0 = time.perf_counter()
        # Host work that needs no result runs while XLA computes: the usable-pixel and variance checks (given
        # sources; detection needs them first), the inputs' limiting magnitudes and the science cut-outs of the
        # footprint figures.
        deferred = sources is not None
        with jax.enable_x64(True), runtime.single_threaded_blas():
            psf_size, t_in, s_in, found = _checked_inputs(template, science, cfg, defer_data_checks=deferred)
            coverage = found["coverage"]
            if sources is None:
                sources = _kernel_candidates(s_in, cfg)
            n_valid = sources.n_valid
            widths = ([found["template_widths"]], [found["science_widths"]])
            plan = plan_from(science.shape, len(sources), cfg, widths, psf_size)
            if n_valid == 0 and plan.fit_region == "stamps":
                if deferred:
                    _check_data(data_facts(t_in, s_in))
                raise _fit_failure(InsufficientKernelSourcesError(0, cfg.min_kernel_sources), coverage, cfg)
            timing["checks"] = time.perf_counter() - t0
            src = sources.padded(plan.capacity)
            t1 = time.perf_counter()
            if self.staged:
                result, stage_times = subtract_staged(t_in, s_in, src, cfg, plan, time.perf_counter)
                timing.update(stage_times)
            else:
                result = subtract(t_in, s_in, src, cfg, plan)  # dispatched: XLA runs it while the host goes on
            input_widths = dict(template=found["template_widths"], science=found["science_widths"])
            started = start_input_figures(template, science, input_widths, runtime.helper_pool(), sources, plan.k)
            if deferred:
                try:
                    _check_data(data_facts(t_in, s_in))
                except ValueError:
                    jax.block_until_ready(result)  # leave no computation running behind the error
                    raise
            result = jax.block_until_ready(result)
            if not self.staged:
                timing["subtract"] = time.perf_counter() - t1
            result = restore_wcs(result, science.wcs)
            md = {k: _plain(v) for k, v in jax.device_get(result.metadata).items()}
        status = RESULTS(int(md["status"]))
        if status == RESULTS.insufficient_sources:
            err = InsufficientKernelSourcesError(md["n_stamps"], cfg.min_kernel_sources)
            raise _fit_failure(err, coverage, cfg)
        if status == RESULTS.no_candidates:
            raise _fit_failure(NoKernelCandidatesError("no kernel candidate survived rejection"), coverage, cfg)
        if status == RESULTS.nonfinite_solution:
            raise _fit_failure(RuntimeError("the kernel solution is not finite"), coverage, cfg)
        if md.pop("variance_factor_failed"):
            raise RuntimeError(
                "variance rescaling factor exceeds 10 by both estimators; the variance planes do not describe "
                "the pixel noise (set do_scale_variance=False to skip rescaling)"
            )
        if plan.fit_region == "stamps":
            _warn_reduced_orders(md, cfg)
        mode = "convolveTemplate" if md.pop("convolves_template") else "convolveScience"
        metadata = dict(md)
        metadata.update(
            mode=mode,
            mode_requested=cfg.mode,
            fit_region=plan.fit_region,
            convolved_exposure="template" if mode == "convolveTemplate" else "science",
            kernel_size=plan.k,
            basis_mode=BASIS_MODES[int(metadata.pop("basis_mode_code"))],
            basis_sigmas=list(metadata["basis_sigmas"]) if cfg.kernel_basis == "alard-lupton" else [],
            basis_degrees=list(cfg.al_deg_gauss) if cfg.kernel_basis == "alard-lupton" else [],
            template_coverage=coverage,
            template_psf_fwhm=psf_fwhm(found["template_widths"]),
            science_psf_fwhm=psf_fwhm(found["science_widths"]),
        )
        t_quality = time.perf_counter()
        with jax.enable_x64(True), runtime.single_threaded_blas():
            metadata.update(self._quality(template, science, result, sources, found, plan.k, started))
        timing["quality"] = time.perf_counter() - t_quality
        timing["total"] = time.perf_counter() - t0
        metadata.update({f"timing.{k}": v for k, v in timing.items()})
        check_quality(metadata, cfg)
        return _caller_precision(dataclasses.replace(result, metadata=metadata))


def _warn_reduced_orders(md: dict, cfg: SubtractConfig) -> None:
    """Warn when the fit solved for lower spatial orders than configured (the surviving stamps could not
    determine them)."""
    reduced = [
        f"{what} order {used} instead of {wanted}"
        for what, used, wanted in (
            ("kernel", md["spatial_kernel_order_used"], cfg.spatial_kernel_order),
            ("background", md["spatial_bg_order_used"], cfg.spatial_bg_order),
        )
        if used < wanted
    ]
    if reduced:
        warnings.warn(
            f"the {md['n_stamps_used']} surviving kernel stamps cannot determine the configured spatial model: "
            f"fitted {' and '.join(reduced)} (a polynomial of order o needs (o + 1)(o + 2)/2 stamps, not all on "
            "one line). Give more kernel sources, a smaller size_cell or a larger n_star_per_cell, or lower the "
            "orders.",
            SpatialOrderWarning,
            stacklevel=3,
        )


def _kernel_candidates(science: Exposure, cfg: SubtractConfig) -> Sources:
    """Kernel candidates found on the science image (`sources=None`), with the configured exclusions and S/N range."""
    bad = bitmask(science.mask_planes, cfg.exclude_mask_planes)
    return detect_sources(science, bad, cfg.detection_snr_range, cfg.max_kernel_sources)


def _checked_inputs(template: Exposure, science: Exposure, cfg: SubtractConfig, defer_data_checks: bool = False):
    """The eager checks and the host pre-checks (§3): (PSF side, core inputs, facts); raises on misuse, on
    images without usable pixels or with invalid variances, and `NoWorkFound` below the required coverage.

    With `defer_data_checks` the usable-pixel and variance checks are left to `_check_data` (the task runs them
    while the subtraction runs) unless another error is to be raised here: those checks come first.
    """
    validate(template, science, cfg)
    psf_size = psf_size_for(template, science, cfg)
    t_in, s_in, _ = core_inputs(template, science, None, psf_size=psf_size)
    found = facts(t_in, s_in, data=not defer_data_checks)
    if not defer_data_checks:
        _check_data(found)
    if found["coverage"] < cfg.required_template_fraction:
        if defer_data_checks:
            _check_data(data_facts(t_in, s_in))
        raise NoWorkFound(
            f"template covers {found['coverage']:.1%} of the science image, less than the required "
            f"{cfg.required_template_fraction:.1%} (required_template_fraction)"
        )
    return psf_size, t_in, s_in, found


def _check_data(found: dict) -> None:
    """Raise on an image without usable pixels or with invalid variances (from `data_facts`)."""
    for name in ("template", "science"):
        if not found[f"{name}_usable"]:
            raise ValueError(f"{name} image has no finite pixel with variance > 0")
        if found[f"{name}_bad_variance"]:
            raise ValueError(
                f"{name} variance must be finite and >= 0 where the image is finite; "
                f"{found[f'{name}_bad_variance']} pixels are not"
            )


def _plain(value):
    """A metadata value as a Python scalar, or a list for an array."""
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


def _caller_precision(tree):
    """Cast float64 leaves to float32 when the caller runs without x64, so that using the result outside the
    task's `enable_x64` scope does not warn about truncation on every operation."""
    if x64_enabled():
        return tree

    def cast(leaf):  # on the host: an eager astype compiles a program per leaf shape
        if isinstance(leaf, jax.Array) and leaf.dtype == np.float64:
            return jax.device_put(np.asarray(leaf, np.float32))
        return leaf

    return jax.tree.map(cast, tree)


def _fit_failure(err: Exception, coverage: float, cfg: SubtractConfig) -> Exception:
    """Below `min_template_fraction_for_expected_success`, a fit failure is tolerable: NoWorkFound."""
    if coverage < cfg.min_template_fraction_for_expected_success:
        return NoWorkFound(
            f"kernel fit failed ({err}) with template coverage {coverage:.1%} below "
            f"{cfg.min_template_fraction_for_expected_success:.1%} (min_template_fraction_for_expected_success)"
        )
    return err
