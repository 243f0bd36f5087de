"""jaxdiff: Alard–Lupton PSF-matched image subtraction in JAX."""

from ._errors import (
    RESULTS as RESULTS,
    InsufficientKernelSourcesError as InsufficientKernelSourcesError,
    NoKernelCandidatesError as NoKernelCandidatesError,
    NoWorkFound as NoWorkFound,
    UnsupportedModeError as UnsupportedModeError,
)
from ._exposure import Exposure as Exposure
from ._io import read_exposure as read_exposure, write_exposure as write_exposure
from ._mask import MASK_PLANES as MASK_PLANES
from ._psf import GaussianPsf as GaussianPsf, GridPsf as GridPsf, ImagePsf as ImagePsf, Psf as Psf
from ._sources import Sources as Sources

__version__ = "0.1.0"
