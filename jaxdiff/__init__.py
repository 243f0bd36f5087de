"""jaxdiff: Alard–Lupton PSF-matched image subtraction in JAX."""

from ._align import align_template as align_template
from ._errors import (
    RESULTS as RESULTS,
)
from ._errors import (
    BadSubtractionError as BadSubtractionError,
)
from ._errors import (
    InsufficientKernelSourcesError as InsufficientKernelSourcesError,
)
from ._errors import (
    NoKernelCandidatesError as NoKernelCandidatesError,
)
from ._errors import (
    NoWorkFound as NoWorkFound,
)
from ._errors import (
    SpatialOrderWarning as SpatialOrderWarning,
)
from ._errors import (
    UnsupportedModeError as UnsupportedModeError,
)
from ._exposure import Exposure as Exposure
from ._inputs import estimate_psf as estimate_psf
from ._inputs import exposure_from_arrays as exposure_from_arrays
from ._io import read_exposure as read_exposure
from ._io import write_exposure as write_exposure
from ._mask import MASK_PLANES as MASK_PLANES
from ._psf import GaussianPsf as GaussianPsf
from ._psf import GridPsf as GridPsf
from ._psf import ImagePsf as ImagePsf
from ._psf import Psf as Psf
from ._sources import Sources as Sources

__version__ = "0.1.0"
from . import basis as basis
from . import batch as batch
from . import convolve as convolve
from . import datasets as datasets
from . import decorrelate as decorrelate
from . import forward as forward
from . import plot as plot
from . import sim as sim
from . import solvers as solvers
from . import spatial as spatial
from . import stamps as stamps
from ._background import BackgroundModel as BackgroundModel
from ._config import SubtractConfig as SubtractConfig
from ._existing import subtract_with_kernel as subtract_with_kernel
from ._kernel import SpatialKernel as SpatialKernel
from ._plan import Plan as Plan
from ._plan import PlanError as PlanError
from ._plan import make_plan as make_plan
from ._result import SubtractResult as SubtractResult
from ._subtract import subtract as subtract
from ._task import AlardLuptonSubtract as AlardLuptonSubtract
from .solvers import LeastSquares as LeastSquares
from .solvers import OptaxSolver as OptaxSolver
