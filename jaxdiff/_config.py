"""`SubtractConfig`: frozen, hashable configuration (ip_diffim's fields, snake_case)."""

import dataclasses

from ._errors import UnsupportedModeError
from .solvers import LeastSquares, OptaxSolver

MODES = ("convolveTemplate", "convolveScience", "auto")
FIT_REGIONS = ("auto", "stamps", "image")


def _field(default, lsst: str | None, doc: str):
    """A config field with its default, the ip_diffim field it mirrors (None: jaxdiff only) and one line of doc.

    `dataclasses.fields(SubtractConfig)[i].metadata` holds `lsst` and `doc` (the documentation's configuration
    reference is generated from them).
    """
    return dataclasses.field(default=default, metadata={"lsst": lsst, "doc": doc})


@dataclasses.dataclass(frozen=True)
class SubtractConfig:
    """Configuration of `AlardLuptonSubtract` / `jd.subtract`: ip_diffim's fields in snake_case.

    Every field's metadata names the ip_diffim field it mirrors (`lsst`, None for jaxdiff's own) and says what it
    does (`doc`); the documentation's configuration reference is generated from them.
    """

    mode: str = _field(
        "convolveTemplate",
        "mode",
        "Which image is convolved: 'convolveTemplate', 'convolveScience', or 'auto' (the one with the narrower PSF).",
    )
    do_decorrelation: bool = _field(True, "doDecorrelation", "Decorrelate the difference image (`finalize`).")
    do_scale_variance: bool = _field(
        True, "doScaleVariance", "Rescale both variance planes to the measured pixel noise before fitting."
    )
    do_subtract_background: bool = _field(
        False,
        "doSubtractBackground",
        "Subtract the fitted differential background from the difference (it is always fitted).",
    )
    required_template_fraction: float = _field(
        0.1,
        "requiredTemplateFraction",
        "Minimum fraction of science pixels covered by the template; below it `run` raises `jd.NoWorkFound`.",
    )
    min_template_fraction_for_expected_success: float = _field(
        0.2,
        "minTemplateFractionForExpectedSuccess",
        "Below this coverage a failed kernel fit raises `jd.NoWorkFound` instead of a fit error.",
    )
    use_preconvolution: bool = _field(
        False,
        "AlardLuptonPreconvolveSubtractTask",
        "Make a score image: convolve the science with its own PSF first (the template is always matched).",
    )
    solver: LeastSquares | OptaxSolver = _field(
        LeastSquares(), None, "Solver of the normal equations: `jd.LeastSquares()` or `jd.OptaxSolver(...)`."
    )
    kernel_basis: str = _field(
        "alard-lupton", "makeKernel.kernel.name", "Kernel basis: 'alard-lupton' (AL) or 'delta-function' (DF)."
    )
    use_regularization: bool = _field(
        True, "useRegularization", "Penalise the roughness of delta-function kernels (delta-function basis only)."
    )
    lambda_value: float = _field(0.2, "lambdaValue", "Weight of the delta-function regularisation.")
    regularization_border_penalty: float = _field(
        3.0, "regularizationBorderPenalty", "Extra regularisation weight of the kernel's border pixels."
    )
    al_sig_gauss: tuple[float, ...] = _field(
        (0.7, 1.5, 3.0), "alardSigGauss", "Gaussian widths (pixels) of the AL basis when they are not derived."
    )
    al_deg_gauss: tuple[int, ...] = _field(
        (4, 2, 2), "alardDegGauss", "Polynomial degree multiplying each Gaussian of the AL basis."
    )
    al_gauss_beta: float = _field(2.0, "alardGaussBeta", "Ratio between successive derived basis widths.")
    al_min_sig: float = _field(0.7, "alardMinSig", "Smallest basis width when the kernel convolves (pixels).")
    al_min_sig_deconv: float = _field(
        0.4, "alardMinSigDeconv", "Smallest basis width when the kernel has to deconvolve (pixels)."
    )
    scale_by_fwhm: bool = _field(True, "scaleByFwhm", "Derive basis widths and kernel size from the two PSF widths.")
    kernel_size: int = _field(
        21, "kernelSize", "Kernel side (odd) when it is not derived from the PSFs, and for delta functions."
    )
    kernel_size_fwhm_scaling: float = _field(
        6.0, "kernelSizeFwhmScaling", "Derived kernel side = this × the largest basis width."
    )
    kernel_size_min: int = _field(21, "kernelSizeMin", "Smallest derived kernel side (odd).")
    kernel_size_max: int = _field(35, "kernelSizeMax", "Largest derived kernel side (odd).")
    kernel_size_buckets: tuple[int, ...] = _field(
        (21, 27, 35),
        None,
        "Odd kernel sides the FWHM rule moves to (the nearest; ties up), so that few programs are compiled.",
    )
    orthonormalize_basis: bool = _field(
        True, None, "Orthonormalise the AL basis (same span and kernel, better conditioned normal equations)."
    )
    spatial_model_type: str = _field(
        "chebyshev1",
        "spatialModelType",
        "Spatial terms: 'chebyshev1' or 'polynomial' (monomials of coordinates scaled to [-1, 1]).",
    )
    spatial_kernel_order: int = _field(1, "spatialKernelOrder", "Order of the kernel's spatial variation.")
    spatial_bg_order: int = _field(2, "spatialBgOrder", "Order of the differential background polynomial.")
    size_cell: int = _field(128, "sizeCellX/Y", "Side of the cells that spread kernel stars over the image (px).")
    n_star_per_cell: int = _field(5, "nStarPerCell", "Kernel stars used per cell.")
    max_spatial_iterations: int = _field(3, "maxSpatialIterations", "Rounds of spatial fit and stamp rejection.")
    candidate_residual_mean_max: float = _field(
        0.25, "candidateResidualMeanMax", "Reject a stamp whose normalised residual mean exceeds this."
    )
    candidate_residual_std_max: float = _field(
        1.50, "candidateResidualStdMax", "Reject a stamp whose normalised residual std exceeds this."
    )
    max_ksum_sigma: float = _field(
        3.0, "maxKsumSigma", "Reject stamps whose kernel sum is this many clipped σ from the mean."
    )
    constant_variance_weighting: bool = _field(
        True, "constantVarianceWeighting", "Weight each stamp by one median variance instead of per pixel."
    )
    restrict_kernel_edge_sources: bool = _field(
        True, "restrictKernelEdgeSources", "Keep kernel stars a kernel width further from the image edges."
    )
    max_kernel_sources: int = _field(
        1000, "maxKernelSources", "Most kernel stars used, brightest first (-1: no limit)."
    )
    min_kernel_sources: int = _field(
        3, "minKernelSources", "Fewest usable kernel stars; fewer raises `jd.InsufficientKernelSourcesError`."
    )
    exclude_mask_planes: tuple[str, ...] = _field(
        ("NO_DATA", "BAD", "SAT", "EDGE", "FAKE", "HIGH_VARIANCE"),
        "excludeMaskPlanes",
        "A stamp touching any of these planes (science or template) is not used for the kernel.",
    )
    preserve_template_mask: tuple[str, ...] = _field(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"),
        "preserveTemplateMask",
        "Template planes carried into the difference's mask.",
    )
    rename_template_mask: tuple[str, ...] = _field(
        ("SAT", "INJECTED", "INJECTED_CORE"),
        "renameTemplateMask",
        "Template planes carried into the difference as `<plane>_TEMPLATE`.",
    )
    preserve_mask_planes: tuple[str, ...] = _field(
        ("INJECTED", "INJECTED_CORE", "INJECTED_TEMPLATE", "INJECTED_CORE_TEMPLATE"),
        None,
        "Planes kept undilated by the convolution (the injection planes).",
    )
    bad_mask_planes: tuple[str, ...] = _field(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        "badMaskPlanes",
        "Pixels filled with the median before preconvolution (score images).",
    )
    detection_snr_range: tuple[float, float] = _field(
        (10.0, 500.0),
        None,
        "S/N range of the kernel stars that jaxdiff detects itself when `sources` is None.",
    )
    allow_kernel_source_detection: bool = _field(
        False,
        "allowKernelSourceDetection",
        "With too few usable kernel sources in the given list, detect candidates on the science image and retry.",
    )
    raise_on_bad_subtraction_ratio: bool = _field(
        False,
        "raiseOnBadSubtractionRatio",
        "Raise `BadSubtractionError` when the difference-to-science footprint ratio passes its threshold (opt-in).",
    )
    bad_subtraction_ratio_threshold: float = _field(
        0.2, "badSubtractionRatioThreshold", "Largest allowed ratio of difference to science footprints."
    )
    bad_subtraction_variation_threshold: float = _field(
        0.4, "badSubtractionVariationThreshold", "Largest allowed variation of that ratio over the image."
    )
    fit_region: str = _field(
        "auto",
        None,
        'Fit the kernel on star "stamps" or on the whole overlap ("image", for alert-sized cut-outs); "auto": image '
        "when no kernel stamp fits.",
    )

    def __post_init__(self):
        check_mode(self.mode)
        if self.kernel_basis not in ("alard-lupton", "delta-function"):
            raise ValueError(
                f"kernel_basis={self.kernel_basis!r} is not allowed; use 'alard-lupton' or 'delta-function'"
            )
        check_fit_region(self.fit_region)
        if self.spatial_model_type not in ("chebyshev1", "polynomial"):
            raise ValueError(
                f"spatial_model_type={self.spatial_model_type!r} is not allowed; use 'chebyshev1' or 'polynomial'"
            )
        if len(self.al_sig_gauss) != len(self.al_deg_gauss):
            raise ValueError(
                f"al_sig_gauss {self.al_sig_gauss} and al_deg_gauss {self.al_deg_gauss} must have equal lengths"
            )
        for name in ("kernel_size", "kernel_size_min", "kernel_size_max"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name}={getattr(self, name)} must be odd")
        if any(int(b) % 2 == 0 or int(b) < 3 for b in self.kernel_size_buckets):
            raise ValueError(f"kernel_size_buckets={self.kernel_size_buckets} must hold odd sizes of at least 3")
        if not isinstance(self.solver, LeastSquares | OptaxSolver):
            raise ValueError(f"solver must be jd.LeastSquares() or jd.OptaxSolver(...), got {self.solver!r}")
        # tuples keep the config hashable even when lists are passed
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    def replace(self, **changes) -> "SubtractConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def check_fit_region(fit_region: str) -> None:
    if fit_region not in FIT_REGIONS:
        raise ValueError(f"fit_region={fit_region!r} is not allowed; use 'auto', 'stamps' or 'image'")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UnsupportedModeError(f"mode={mode!r} is not allowed; use 'auto', 'convolveTemplate' or 'convolveScience'")
