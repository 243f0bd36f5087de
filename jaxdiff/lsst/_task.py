"""`AlardLuptonSubtractTask`: a real `lsst.pipe.base.PipelineTask` around `jd.AlardLuptonSubtract`."""

import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from lsst.images import DifferenceImage, VisitImage
from lsst.utils.timer import timeMethod

from .. import _errors
from .._config import SubtractConfig
from .._kernel import SpatialKernel
from .._task import AlardLuptonSubtract
from . import _convert
from ._external import apply_external_calibration

_DIMENSIONS = ("instrument", "visit", "detector")


class InsufficientKernelSourcesError(pipeBase.AlgorithmError, _errors.InsufficientKernelSourcesError):
    """Too few usable kernel sources; a `lsst.pipe.base.AlgorithmError` (and a `jd` error)."""

    @property
    def metadata(self) -> dict:
        return {"nSources": self.n_sources, "nRequired": self.n_required}


class NoKernelCandidatesError(pipeBase.AlgorithmError, _errors.NoKernelCandidatesError):
    """No kernel candidate survived the rejection loop; a `lsst.pipe.base.AlgorithmError`."""

    @property
    def metadata(self) -> dict:
        return {}


class BadSubtractionError(pipeBase.AlgorithmError, _errors.BadSubtractionError):
    """The difference keeps too much of the sources (raiseOnBadSubtractionRatio); a `lsst.pipe.base.AlgorithmError`."""

    @property
    def metadata(self) -> dict:
        return {"ratio": self.ratio, "threshold": self.threshold}


class AlardLuptonSubtractConnections(pipeBase.PipelineTaskConnections, dimensions=_DIMENSIONS):
    """Butler connections with ip_diffim's names (`template`, `science`, `sources` → `difference`, …)."""

    template = cT.Input(
        doc="Template warped and resampled onto the science pixel grid.",
        name="template_detector",
        storageClass="VisitImage",
        dimensions=_DIMENSIONS,
    )
    science = cT.Input(
        doc="Science exposure to subtract from.",
        name="preliminary_visit_image",
        storageClass="VisitImage",
        dimensions=_DIMENSIONS,
    )
    sources = cT.Input(
        doc="Sources measured on the science exposure, used to select kernel stamps (x/y or slot_Centroid_*).",
        name="single_visit_star",
        storageClass="ArrowAstropy",
        dimensions=_DIMENSIONS,
    )
    difference = cT.Output(
        doc="PSF-matched difference image (science minus matched template), with the matching kernel.",
        name="difference_image_predetection",
        storageClass="DifferenceImage",
        dimensions=_DIMENSIONS,
    )
    matchedTemplate = cT.Output(
        doc="Template as subtracted (PSF-matched in convolveTemplate mode).",
        name="template_matched",
        storageClass="VisitImage",
        dimensions=_DIMENSIONS,
    )
    psfMatchingKernel = cT.Output(
        doc="Spatially varying PSF-matching kernel (afw convention: applied as a correlation).",
        name="difference_kernel",
        storageClass="ConvolutionKernel",
        dimensions=_DIMENSIONS,
    )
    kernelSources = cT.Output(
        doc="Sources handed to the kernel fit.",
        name="difference_kernel_sources",
        storageClass="ArrowAstropy",
        dimensions=_DIMENSIONS,
    )
    finalizedPsfApCorrCatalog = cT.Input(
        doc="Per-visit catalogue of final PSFs and aperture corrections; the science detector's row replaces the "
        "science PSF and aperture corrections (only with doApplyExternalCalibrations).",
        name="finalized_psf_ap_corr_catalog",
        storageClass="ExposureCatalog",
        dimensions=("instrument", "visit"),
    )

    def __init__(self, *, config=None):
        super().__init__(config=config)
        if not config.doApplyExternalCalibrations:
            del self.finalizedPsfApCorrCatalog


class AlardLuptonSubtractConfig(pipeBase.PipelineTaskConfig, pipelineConnections=AlardLuptonSubtractConnections):
    """ip_diffim's `AlardLuptonSubtractConfig` fields (makeKernel's flattened in); see `toSubtractConfig`."""

    mode = pexConfig.ChoiceField(
        dtype=str,
        default="convolveTemplate",
        allowed={
            "auto": "Choose which image to convolve at runtime (the one with the narrower PSF).",
            "convolveScience": "Only convolve the science image.",
            "convolveTemplate": "Only convolve the template image.",
        },
        doc="Which image gets convolved.",
    )
    doDecorrelation = pexConfig.Field(dtype=bool, default=True, doc="Decorrelate the difference image noise.")
    doScaleVariance = pexConfig.Field(
        dtype=bool, default=True, doc="Rescale the variance planes to match the measured pixel noise."
    )
    doSubtractBackground = pexConfig.Field(
        dtype=bool, default=False, doc="Subtract the fitted differential background from the difference image."
    )
    requiredTemplateFraction = pexConfig.Field(
        dtype=float, default=0.1, doc="Minimum fraction of science pixels the template must cover (else no work)."
    )
    minTemplateFractionForExpectedSuccess = pexConfig.Field(
        dtype=float,
        default=0.2,
        doc="Below this template coverage a kernel-fit failure is reported as NoWorkFound.",
    )
    kernelBasisSet = pexConfig.ChoiceField(
        dtype=str,
        default="alard-lupton",
        allowed={"alard-lupton": "Gauss-Hermite basis (AL)", "delta-function": "Delta-function basis (DF)"},
        doc="Kernel basis (makeKernel.kernel.name).",
    )
    alardSigGauss = pexConfig.ListField(dtype=float, default=[0.7, 1.5, 3.0], doc="Gaussian widths of the AL basis.")
    alardDegGauss = pexConfig.ListField(dtype=int, default=[4, 2, 2], doc="Polynomial degrees of each Gaussian.")
    alardGaussBeta = pexConfig.Field(dtype=float, default=2.0, doc="Ratio of successive Gaussian widths.")
    alardMinSig = pexConfig.Field(dtype=float, default=0.7, doc="Minimum Gaussian width (convolution).")
    alardMinSigDeconv = pexConfig.Field(dtype=float, default=0.4, doc="Minimum Gaussian width (deconvolution).")
    scaleByFwhm = pexConfig.Field(dtype=bool, default=True, doc="Scale kernel size and widths by the PSF FWHM.")
    kernelSize = pexConfig.Field(dtype=int, default=21, doc="Kernel size (odd) when not scaled by FWHM.")
    kernelSizeFwhmScaling = pexConfig.Field(dtype=float, default=6.0, doc="Kernel size in units of the FWHM.")
    kernelSizeMin = pexConfig.Field(dtype=int, default=21, doc="Minimum kernel size (odd).")
    kernelSizeMax = pexConfig.Field(dtype=int, default=35, doc="Maximum kernel size (odd).")
    useRegularization = pexConfig.Field(dtype=bool, default=True, doc="Regularize the delta-function basis.")
    lambdaValue = pexConfig.Field(dtype=float, default=0.2, doc="Regularization strength.")
    regularizationBorderPenalty = pexConfig.Field(dtype=float, default=3.0, doc="Border penalty of the regularizer.")
    spatialModelType = pexConfig.ChoiceField(
        dtype=str,
        default="chebyshev1",
        allowed={"chebyshev1": "Chebyshev polynomials of the first kind", "polynomial": "Plain polynomials"},
        doc="Functions of the spatial kernel and background variation.",
    )
    spatialKernelOrder = pexConfig.Field(dtype=int, default=1, doc="Spatial order of the kernel variation.")
    spatialBgOrder = pexConfig.Field(dtype=int, default=2, doc="Spatial order of the differential background.")
    sizeCellX = pexConfig.Field(dtype=int, default=128, doc="Kernel-candidate cell width (pixels).")
    sizeCellY = pexConfig.Field(dtype=int, default=128, doc="Kernel-candidate cell height; must equal sizeCellX.")
    nStarPerCell = pexConfig.Field(dtype=int, default=5, doc="Kernel candidates kept per cell.")
    maxSpatialIterations = pexConfig.Field(dtype=int, default=3, doc="Rejection iterations of the spatial fit.")
    candidateResidualMeanMax = pexConfig.Field(dtype=float, default=0.25, doc="Max |mean| of stamp residuals.")
    candidateResidualStdMax = pexConfig.Field(dtype=float, default=1.50, doc="Max std of stamp residuals.")
    maxKsumSigma = pexConfig.Field(dtype=float, default=3.0, doc="Kernel-sum clipping threshold (sigma).")
    constantVarianceWeighting = pexConfig.Field(dtype=bool, default=True, doc="Use a constant stamp variance.")
    restrictKernelEdgeSources = pexConfig.Field(
        dtype=bool, default=True, doc="Reject sources whose stamps reach the image edge."
    )
    maxKernelSources = pexConfig.Field(dtype=int, default=1000, doc="Maximum kernel sources (-1: no limit).")
    minKernelSources = pexConfig.Field(dtype=int, default=3, doc="Minimum usable kernel sources.")
    excludeMaskPlanes = pexConfig.ListField(
        dtype=str,
        default=["NO_DATA", "BAD", "SAT", "EDGE", "FAKE", "HIGH_VARIANCE"],
        doc="Mask planes that exclude a source from kernel fitting (afw names).",
    )
    badMaskPlanes = pexConfig.ListField(
        dtype=str, default=["NO_DATA", "BAD", "SAT", "EDGE"], doc="Mask planes ignored in statistics."
    )
    preserveTemplateMask = pexConfig.ListField(
        dtype=str, default=["NO_DATA", "BAD", "HIGH_VARIANCE"], doc="Template mask planes copied to the difference."
    )
    renameTemplateMask = pexConfig.ListField(
        dtype=str,
        default=["SAT", "INJECTED", "INJECTED_CORE"],
        doc="Template mask planes copied to the difference as <name>_TEMPLATE.",
    )

    doApplyExternalCalibrations = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Replace the science PSF and aperture corrections with the finalizedPsfApCorrCatalog row.",
    )
    allowKernelSourceDetection = pexConfig.Field(
        dtype=bool, default=False, doc="Detect kernel sources on the science image when too few are usable."
    )
    raiseOnBadSubtractionRatio = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Raise if the difference-to-science footprint ratio exceeds badSubtractionRatioThreshold.",
    )
    badSubtractionRatioThreshold = pexConfig.Field(
        dtype=float, default=0.2, doc="Maximum mean ratio of |difference| to science in source footprints."
    )
    badSubtractionVariationThreshold = pexConfig.Field(
        dtype=float, default=0.4, doc="Maximum standard deviation of that ratio across footprints."
    )
    fitRegion = pexConfig.ChoiceField(
        dtype=str,
        default="auto",
        allowed={
            "auto": "Fit on the whole overlap when no kernel stamp fits the image, else on stamps.",
            "stamps": "Fit on stamps around kernel sources (ip_diffim).",
            "image": "Fit a spatially constant kernel on the whole overlap.",
        },
        doc="Where the kernel is fitted (jaxdiff).",
    )

    def validate(self):
        super().validate()
        if self.sizeCellX != self.sizeCellY:
            raise pexConfig.FieldValidationError(
                AlardLuptonSubtractConfig.sizeCellY, self, "jaxdiff uses square cells: sizeCellY must equal sizeCellX"
            )
        if len(self.alardSigGauss) != len(self.alardDegGauss):
            raise pexConfig.FieldValidationError(
                AlardLuptonSubtractConfig.alardDegGauss, self, "needs as many entries as alardSigGauss"
            )

    def toSubtractConfig(self) -> SubtractConfig:
        """The equivalent `jd.SubtractConfig`.

        Returns:
            A `jd.SubtractConfig` with every field above mapped to its snake_case counterpart.
        """
        return SubtractConfig(
            mode=self.mode,
            do_decorrelation=self.doDecorrelation,
            do_scale_variance=self.doScaleVariance,
            do_subtract_background=self.doSubtractBackground,
            required_template_fraction=self.requiredTemplateFraction,
            min_template_fraction_for_expected_success=self.minTemplateFractionForExpectedSuccess,
            kernel_basis=self.kernelBasisSet,
            use_regularization=self.useRegularization,
            lambda_value=self.lambdaValue,
            regularization_border_penalty=self.regularizationBorderPenalty,
            al_sig_gauss=tuple(self.alardSigGauss),
            al_deg_gauss=tuple(self.alardDegGauss),
            al_gauss_beta=self.alardGaussBeta,
            al_min_sig=self.alardMinSig,
            al_min_sig_deconv=self.alardMinSigDeconv,
            scale_by_fwhm=self.scaleByFwhm,
            kernel_size=self.kernelSize,
            kernel_size_fwhm_scaling=self.kernelSizeFwhmScaling,
            kernel_size_min=self.kernelSizeMin,
            kernel_size_max=self.kernelSizeMax,
            spatial_model_type=self.spatialModelType,
            spatial_kernel_order=self.spatialKernelOrder,
            spatial_bg_order=self.spatialBgOrder,
            size_cell=self.sizeCellX,
            n_star_per_cell=self.nStarPerCell,
            max_spatial_iterations=self.maxSpatialIterations,
            candidate_residual_mean_max=self.candidateResidualMeanMax,
            candidate_residual_std_max=self.candidateResidualStdMax,
            max_ksum_sigma=self.maxKsumSigma,
            constant_variance_weighting=self.constantVarianceWeighting,
            restrict_kernel_edge_sources=self.restrictKernelEdgeSources,
            max_kernel_sources=self.maxKernelSources,
            min_kernel_sources=self.minKernelSources,
            exclude_mask_planes=tuple(self.excludeMaskPlanes),
            bad_mask_planes=tuple(self.badMaskPlanes),
            preserve_template_mask=tuple(self.preserveTemplateMask),
            rename_template_mask=tuple(self.renameTemplateMask),
            allow_kernel_source_detection=self.allowKernelSourceDetection,
            raise_on_bad_subtraction_ratio=self.raiseOnBadSubtractionRatio,
            bad_subtraction_ratio_threshold=self.badSubtractionRatioThreshold,
            bad_subtraction_variation_threshold=self.badSubtractionVariationThreshold,
            fit_region=self.fitRegion,
        )


def _lsst_error(err: Exception) -> Exception:
    """The `lsst.pipe.base` counterpart of a jaxdiff error (the error itself when there is none)."""
    if isinstance(err, _errors.NoWorkFound):
        return pipeBase.NoWorkFound(str(err))
    if isinstance(err, _errors.InsufficientKernelSourcesError):
        return InsufficientKernelSourcesError(err.n_sources, err.n_required)
    if isinstance(err, _errors.NoKernelCandidatesError):
        return NoKernelCandidatesError(str(err))
    if isinstance(err, _errors.BadSubtractionError):
        return BadSubtractionError(err.ratio, err.threshold, err.what)
    return err


class AlardLuptonSubtractTask(pipeBase.PipelineTask):
    """Alard–Lupton PSF-matched image subtraction of `lsst.images` VisitImages, computed by jaxdiff.

    The pixels are converted to `jd.Exposure`s (see `jaxdiff.lsst.to_exposure`), subtracted by
    `jd.AlardLuptonSubtract` with `config.toSubtractConfig()`, and converted back; fit statistics go
    into the task metadata under ip_diffim's keys.
    """

    ConfigClass = AlardLuptonSubtractConfig
    _DefaultName = "alardLuptonSubtract"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.subtractor = AlardLuptonSubtract(self.config.toSubtractConfig())

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        outputs = self.run(**inputs)
        butlerQC.put(outputs, outputRefs)

    @timeMethod
    def run(
        self, template: VisitImage, science: VisitImage, sources, finalizedPsfApCorrCatalog=None
    ) -> pipeBase.Struct:
        """PSF-match, subtract and (if `doDecorrelation`) decorrelate, in the configured `mode`.

        Arguments:
            template: template `VisitImage` on the science pixel grid (its box covers the science box).
            science: science `VisitImage`.
            sources: astropy table of kernel-candidate positions (`x`/`y` or `slot_Centroid_x/y`).
            finalizedPsfApCorrCatalog: optional per-visit calibration catalogue; its row for the science
                detector replaces the science PSF and aperture corrections (see `_external`). Given, it is
                applied whatever `doApplyExternalCalibrations` says (that field only adds the connection).

        Returns:
            `Struct` with `difference` (`DifferenceImage`), `matchedTemplate` (`VisitImage`),
            `backgroundModel` (`jd.BackgroundModel`), `psfMatchingKernel` (`ImageBasisConvolutionKernel`)
            and `kernelSources` (astropy table).
        """
        if finalizedPsfApCorrCatalog is not None:
            with self.timer("applyExternalCalibrations"):
                science = apply_external_calibration(science, finalizedPsfApCorrCatalog)
        return self._subtract(template, science, sources, self.subtractor.run)

    @timeMethod
    def runConvolveTemplate(self, template: VisitImage, science: VisitImage, sources) -> pipeBase.Struct:
        """`run` with the template convolved to match the science PSF (arguments and result as `run`)."""
        return self._subtract(template, science, sources, self.subtractor.run_convolve_template)

    @timeMethod
    def runConvolveScience(self, template: VisitImage, science: VisitImage, sources) -> pipeBase.Struct:
        """`run` with the science convolved to match the template PSF (arguments and result as `run`)."""
        return self._subtract(template, science, sources, self.subtractor.run_convolve_science)

    @timeMethod
    def finalize(
        self,
        template: VisitImage,
        science: VisitImage,
        difference: VisitImage,
        kernel: SpatialKernel,
        templateMatched: bool = True,
        preConvMode: bool = False,
        preConvKernel=None,
        spatiallyVarying: bool = False,
    ) -> pipeBase.Struct:
        """Decorrelate a difference image (the noise correction `run` applies when `doDecorrelation`).

        Arguments:
            template, science: the `VisitImage`s that were subtracted.
            difference: the undecorrelated difference (`VisitImage` or `DifferenceImage`).
            kernel: the fitted `jd.SpatialKernel`.
            templateMatched: True if the template was convolved, False if the science was.
            preConvMode: whether the science was preconvolved with `preConvKernel` (a 2-D array).
            preConvKernel: the preconvolution kernel image.
            spatiallyVarying: evaluate the correction on a grid of positions (else at the centre).

        Returns:
            `Struct` with `difference`, the decorrelated `DifferenceImage`.
        """
        with self.timer("convertInputs"):
            exposures = [_convert.to_exposure(im) for im in (template, science, difference)]
        try:
            out = self.subtractor.finalize(
                *exposures,
                kernel,
                template_matched=templateMatched,
                preconv_mode=preConvMode,
                preconv_kernel=None if preConvKernel is None else np.asarray(preConvKernel),
                spatially_varying=spatiallyVarying,
            )
        except Exception as err:
            raise _lsst_error(err) from err
        psf = (science if templateMatched else template).psf
        result = _convert.from_exposure(
            out, difference, cls=DifferenceImage, psf=psf, kernel=_convert.kernel_to_lsst(kernel)
        )
        return pipeBase.Struct(difference=result)

    def _subtract(self, template, science, sources, method) -> pipeBase.Struct:
        with self.timer("convertInputs"):
            template_exp = _convert.to_exposure(template)
            science_exp = _convert.to_exposure(science)
            jd_sources = _convert.to_sources(sources)
        try:
            result = method(template_exp, science_exp, jd_sources)
        except Exception as err:
            raise _lsst_error(err) from err
        md = result.metadata
        self._record(md)
        with self.timer("convertOutputs"):
            kernel = _convert.kernel_to_lsst(result.psf_matching_kernel)
            psf = science.psf if md["mode"] == "convolveTemplate" else template.psf
            difference = _convert.from_exposure(
                result.difference,
                science,
                cls=DifferenceImage,
                psf=psf,
                kernel=kernel,
                aperture_corrections=dict(science.aperture_corrections),
            )
            matched = _convert.from_exposure(result.matched_template, template)
        return pipeBase.Struct(
            difference=difference,
            matchedTemplate=matched,
            backgroundModel=result.background_model,
            psfMatchingKernel=kernel,
            kernelSources=_convert.sources_table(jd_sources),
        )

    def _record(self, md: dict) -> None:
        """Write ip_diffim's metadata keys (and jaxdiff's fit statistics) into the task metadata."""
        values = {
            "templateCoveragePercent": 100.0 * md["template_coverage"],
            "scaleTemplateVarianceFactor": md["template_variance_factor"],
            "scaleScienceVarianceFactor": md["science_variance_factor"],
            "sciencePsfSize": md["science_psf_fwhm"],
            "templatePsfSize": md["template_psf_fwhm"],
            "convolvedExposure": "Template" if md["mode"] == "convolveTemplate" else "Science",
            "nPsfSources": md["n_stamps"],
            "nKernelSourcesUsed": md["n_stamps_used"],
            "spatialKernelSum": md["kernel_sum"],
            "spatialConditionNum": md["condition_number"],
            "kernelSize": md["kernel_size"],
            "residualMean": md["residual_mean"],
            "residualStd": md["residual_std"],
            "differenceFootprintRatioMean": md.get("difference_footprint_ratio_mean"),
            "differenceFootprintRatioStdev": md.get("difference_footprint_ratio_stdev"),
            "scienceLimitingMagnitude": md.get("science_limiting_magnitude"),
            "templateLimitingMagnitude": md.get("template_limiting_magnitude"),
            "diffimLimitingMagnitude": md.get("difference_limiting_magnitude"),
            "fitRegion": md.get("fit_region"),
        }
        for key, value in values.items():
            if value is None:
                continue
            self.metadata[key] = value.item() if isinstance(value, np.generic) else value
