"""`AlardLuptonSubtract`: the imperative shell around `jd.subtract` (checks, errors, timing, metadata)."""

import dataclasses
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._config import SubtractConfig, check_mode
from ._detect import detect_sources
from ._errors import RESULTS, InsufficientKernelSourcesError, NoKernelCandidatesError, NoWorkFound
from ._existing import fixed_kernel_plan, subtract_with_kernel
from ._exposure import Exposure
from ._finalize import finalize as _finalize
from ._kernel import SpatialKernel
from ._mask import bitmask
from ._psf import as_psf
from ._quality import check_quality, quality_figures
from ._result import SubtractResult
from ._sources import Sources
from ._stats import usable
from ._subtract import make_plan, psf_widths, subtract_staged
from ._types import x64_enabled


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
    for name, e in (("template", template), ("science", science)):
        if not bool(_any_usable(e.image, e.variance)):
            raise ValueError(f"{name} image has no finite pixel with variance > 0")


@jax.jit
def _any_usable(image, variance):
    return jnp.any(usable(image, variance))


def template_coverage(template: Exposure, science: Exposure) -> float:
    """Fraction of science pixels with data in both images (NO_DATA in neither mask; ALGORITHM §3)."""
    sx0, sy0, _, _ = science.bbox
    tx0, ty0, _, _ = template.bbox
    ny, nx = science.shape
    tmask = np.asarray(template.mask)[sy0 - ty0 : sy0 - ty0 + ny, sx0 - tx0 : sx0 - tx0 + nx]
    nd_t = bitmask(template.mask_planes, ["NO_DATA"])
    nd_s = bitmask(science.mask_planes, ["NO_DATA"])
    lacks = ((tmask & nd_t) != 0) | ((np.asarray(science.mask) & nd_s) != 0)
    return 1.0 - float(np.mean(lacks))


class AlardLuptonSubtract(eqx.Module):
    """PSF-matched image subtraction with LSST's `AlardLuptonSubtractTask` behaviour.

    Arguments:
        config: a `SubtractConfig`; its fields may also be given as keywords (they override it).
    """

    config: SubtractConfig = eqx.field(static=True)

    def __init__(self, config: SubtractConfig | None = None, **fields):
        config = SubtractConfig() if config is None else config
        if fields:
            unknown = set(fields) - {f.name for f in dataclasses.fields(SubtractConfig)}
            if unknown:
                raise TypeError(f"unknown SubtractConfig field(s): {', '.join(sorted(unknown))}")
            config = config.replace(**fields)
        self.config = config

    def run(
        self, template: Exposure, science: Exposure, sources: Sources | None = None, *, science_psf=None
    ) -> SubtractResult:
        """PSF-match, subtract and (unless `do_decorrelation` is False) decorrelate; mode from the config.

        `science_psf`: a `jd.Psf` (or unit-sum odd image) replacing `science.psf` for this call, e.g. a final PSF
        from an external calibration (ip_diffim's `doApplyExternalCalibrations`); jaxdiff exposures carry no
        aperture corrections, so only the PSF is replaced here (the LSST task also swaps those).
        """
        if science_psf is not None:
            science = eqx.tree_at(lambda e: e.psf, science, as_psf(science_psf), is_leaf=lambda x: x is None)
        return self._run(template, science, sources, self.config)

    def run_convolve_template(self, template, science, sources=None) -> SubtractResult:
        """`run` with the template convolved to match the science PSF."""
        return self._run(template, science, sources, self.config.replace(mode="convolveTemplate"))

    def run_convolve_science(self, template, science, sources=None) -> SubtractResult:
        """`run` with the science convolved to match the template PSF."""
        return self._run(template, science, sources, self.config.replace(mode="convolveScience"))

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
        on the science image when None) only set the footprints of the quality figures."""
        cfg = self.config
        t0 = time.perf_counter()
        with jax.enable_x64(True):
            validate(template, science, cfg)
            coverage = template_coverage(template, science)
            if coverage < cfg.required_template_fraction:
                raise NoWorkFound(
                    f"template covers {coverage:.1%} of the science image, less than the required "
                    f"{cfg.required_template_fraction:.1%} (required_template_fraction)"
                )
            plan = fixed_kernel_plan(template, science, kernel, cfg)
            result = subtract_with_kernel(template, science, kernel, cfg, fit_flux_scale)
            md = {k: np.asarray(v).item() for k, v in jax.device_get(result.metadata).items()}
        if RESULTS(int(md["status"])) != RESULTS.successful:
            raise RuntimeError("the background fit with the given kernel is not finite")
        md.pop("variance_factor_failed")
        md.update(mode=plan.mode, fit_region="existing_kernel", kernel_size=kernel.size, template_coverage=coverage)
        with jax.enable_x64(True):
            if sources is None:
                bad = bitmask(science.mask_planes, cfg.exclude_mask_planes)
                sources = detect_sources(science, bad, cfg.detection_snr_range, cfg.max_kernel_sources)
            wt, ws = psf_widths(template.psf), psf_widths(science.psf)
            widths = dict(template=wt, science=ws, difference=psf_widths(result.difference.psf))
            md.update(
                quality_figures(
                    template, science, result.difference, sources, widths, kernel.size, cfg.detection_snr_range[0]
                )
            )
        md["timing.total"] = time.perf_counter() - t0
        check_quality(md, cfg)
        return _caller_precision(dataclasses.replace(result, metadata=md))

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
            with jax.enable_x64(True):
                bad = bitmask(science.mask_planes, cfg.exclude_mask_planes)
                detected = detect_sources(science, bad, cfg.detection_snr_range, cfg.max_kernel_sources)
            result = self._run_once(template, science, detected, cfg)
            result.metadata.update(kernel_sources="detected", kernel_sources_error=str(err))
            return result
        result.metadata["kernel_sources"] = "detected" if sources is None else "given"
        return result

    def _run_once(self, template, science, sources, cfg: SubtractConfig) -> SubtractResult:
        timing = {}
        t0 = time.perf_counter()
        with jax.enable_x64(True):
            validate(template, science, cfg)
            coverage = template_coverage(template, science)
            if coverage < cfg.required_template_fraction:
                raise NoWorkFound(
                    f"template covers {coverage:.1%} of the science image, less than the required "
                    f"{cfg.required_template_fraction:.1%} (required_template_fraction)"
                )
            if sources is None:
                bad = bitmask(science.mask_planes, cfg.exclude_mask_planes)
                sources = detect_sources(science, bad, cfg.detection_snr_range, cfg.max_kernel_sources)
            n_valid = sources.n_valid if len(sources) else 0
            plan = make_plan(template, science, sources, cfg)
            if n_valid == 0 and plan.fit_region == "stamps":
                raise _fit_failure(InsufficientKernelSourcesError(0, cfg.min_kernel_sources), coverage, cfg)
            timing["checks"] = time.perf_counter() - t0
            result, stage_times = subtract_staged(template, science, sources, cfg, plan, time.perf_counter)
            timing.update(stage_times)
            md = {k: np.asarray(v).item() for k, v in jax.device_get(result.metadata).items()}
        status = RESULTS(int(md["status"]))
        if status == RESULTS.insufficient_sources:
            err = InsufficientKernelSourcesError(md["n_stamps"], cfg.min_kernel_sources)
            raise _fit_failure(err, coverage, cfg)
        if status == RESULTS.no_candidates:
            raise _fit_failure(NoKernelCandidatesError("no kernel candidate survived rejection"), coverage, cfg)
        if status == RESULTS.nonfinite_solution:
            raise _fit_failure(RuntimeError("the kernel solution is not finite"), coverage, cfg)
        if md["variance_factor_failed"]:
            raise RuntimeError(
                "variance rescaling factor exceeds 10 by both estimators; the variance planes do not describe "
                "the pixel noise (set do_scale_variance=False to skip rescaling)"
            )
        timing["total"] = time.perf_counter() - t0
        wt, ws = psf_widths(template.psf), psf_widths(science.psf)
        metadata = dict(md)
        metadata.pop("variance_factor_failed")
        metadata.update(
            mode=plan.mode,
            mode_requested=cfg.mode,
            fit_region=plan.fit_region,
            convolved_exposure="template" if plan.mode == "convolveTemplate" else "science",
            kernel_size=plan.k,
            basis_mode=plan.basis_mode,
            basis_sigmas=list(plan.basis_sigmas),
            basis_degrees=list(cfg.al_deg_gauss) if cfg.kernel_basis == "alard-lupton" else [],
            template_coverage=coverage,
            template_psf_fwhm=None if wt is None else 2.3548 * float(np.sqrt(0.5 * (wt[0] ** 2 + wt[1] ** 2))),
            science_psf_fwhm=None if ws is None else 2.3548 * float(np.sqrt(0.5 * (ws[0] ** 2 + ws[1] ** 2))),
        )
        metadata.update({f"timing.{k}": v for k, v in timing.items()})
        t_quality = time.perf_counter()
        with jax.enable_x64(True):
            widths = dict(template=wt, science=ws, difference=psf_widths(result.difference.psf))
            figures = quality_figures(
                template, science, result.difference, sources, widths, plan.k, cfg.detection_snr_range[0]
            )
            metadata.update(figures)
        metadata["timing.quality"] = time.perf_counter() - t_quality
        check_quality(metadata, cfg)
        return _caller_precision(dataclasses.replace(result, metadata=metadata))


def _caller_precision(tree):
    """Cast float64 leaves to float32 when the caller runs without x64, so that using the result outside the
    task's `enable_x64` scope does not warn about truncation on every operation."""
    if x64_enabled():
        return tree

    def cast(leaf):
        if isinstance(leaf, jax.Array) and leaf.dtype == np.float64:
            return leaf.astype(np.float32)
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
