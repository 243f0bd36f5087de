"""`SubtractConfig`: frozen, hashable configuration (ip_diffim's fields, snake_case)."""

import dataclasses

from ._errors import UnsupportedModeError
from .solvers import LeastSquares, OptaxSolver

MODES = ("convolveTemplate", "convolveScience", "auto")


@dataclasses.dataclass(frozen=True)
class SubtractConfig:
    """Configuration of `AlardLuptonSubtract` / `jd.subtract`. Each field mirrors the ip_diffim field named."""

    mode: str = "convolveTemplate"  # AlardLuptonSubtractConfig.mode
    do_decorrelation: bool = True  # doDecorrelation
    do_scale_variance: bool = True  # doScaleVariance
    do_subtract_background: bool = False  # doSubtractBackground (the background is always fitted)
    required_template_fraction: float = 0.1  # requiredTemplateFraction
    min_template_fraction_for_expected_success: float = 0.2  # minTemplateFractionForExpectedSuccess
    use_preconvolution: bool = False  # AlardLuptonPreconvolveSubtractTask
    solver: LeastSquares | OptaxSolver = LeastSquares()  # (jaxdiff) closed form or optax
    kernel_basis: str = "alard-lupton"  # makeKernel.kernel.name: AL or DF
    use_regularization: bool = True  # useRegularization (delta-function basis only)
    lambda_value: float = 0.2  # lambdaValue
    regularization_border_penalty: float = 3.0  # regularizationBorderPenalty
    al_sig_gauss: tuple[float, ...] = (0.7, 1.5, 3.0)  # alardSigGauss
    al_deg_gauss: tuple[int, ...] = (4, 2, 2)  # alardDegGauss
    al_gauss_beta: float = 2.0  # alardGaussBeta
    al_min_sig: float = 0.7  # alardMinSig
    al_min_sig_deconv: float = 0.4  # alardMinSigDeconv
    scale_by_fwhm: bool = True  # scaleByFwhm
    kernel_size: int = 21  # kernelSize
    kernel_size_fwhm_scaling: float = 6.0  # kernelSizeFwhmScaling
    kernel_size_min: int = 21  # kernelSizeMin
    kernel_size_max: int = 35  # kernelSizeMax
    kernel_size_buckets: tuple[int, ...] = (21, 27, 35)  # (jaxdiff) sizes the FWHM rule rounds up to: one program each
    orthonormalize_basis: bool = True  # (jaxdiff)
    spatial_model_type: str = "chebyshev1"  # spatialModelType
    spatial_kernel_order: int = 1  # spatialKernelOrder
    spatial_bg_order: int = 2  # spatialBgOrder
    size_cell: int = 128  # sizeCellX/Y
    n_star_per_cell: int = 5  # nStarPerCell
    max_spatial_iterations: int = 3  # maxSpatialIterations
    candidate_residual_mean_max: float = 0.25  # candidateResidualMeanMax
    candidate_residual_std_max: float = 1.50  # candidateResidualStdMax
    max_ksum_sigma: float = 3.0  # maxKsumSigma
    constant_variance_weighting: bool = True  # constantVarianceWeighting
    restrict_kernel_edge_sources: bool = True  # restrictKernelEdgeSources
    max_kernel_sources: int = 1000  # maxKernelSources (-1: no limit)
    min_kernel_sources: int = 3  # minKernelSources
    exclude_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE", "FAKE", "HIGH_VARIANCE")
    preserve_template_mask: tuple[str, ...] = ("NO_DATA", "BAD", "HIGH_VARIANCE")
    rename_template_mask: tuple[str, ...] = ("SAT", "INJECTED", "INJECTED_CORE")
    preserve_mask_planes: tuple[str, ...] = (
        "INJECTED",
        "INJECTED_CORE",
        "INJECTED_TEMPLATE",
        "INJECTED_CORE_TEMPLATE",
    )
    bad_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE")
    detection_snr_range: tuple[float, float] = (10.0, 500.0)

    def __post_init__(self):
        check_mode(self.mode)
        if self.kernel_basis not in ("alard-lupton", "delta-function"):
            raise ValueError(
                f"kernel_basis={self.kernel_basis!r} is not allowed; use 'alard-lupton' or 'delta-function'"
            )
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


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UnsupportedModeError(f"mode={mode!r} is not allowed; use 'auto', 'convolveTemplate' or 'convolveScience'")
