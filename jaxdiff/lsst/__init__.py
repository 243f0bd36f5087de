"""LSST pipeline integration: `AlardLuptonSubtractTask`, a real `lsst.pipe.base.PipelineTask`.

Needs the optional extra `jaxdiff[lsst]` (Python ≥ 3.12). This is the only jaxdiff module that imports
`lsst.*`; `import jaxdiff` does not import it. `PIPELINE` is the path of a pipeline YAML running the
task under LSST's label `subtractImages`.
"""

import os as _os

from ._convert import from_exposure as from_exposure
from ._convert import images_name as images_name
from ._convert import kernel_to_lsst as kernel_to_lsst
from ._convert import legacy_name as legacy_name
from ._convert import sources_table as sources_table
from ._convert import to_exposure as to_exposure
from ._convert import to_sources as to_sources
from ._external import ExternalCalibrationError as ExternalCalibrationError
from ._external import apply_external_calibration as apply_external_calibration
from ._task import AlardLuptonSubtractConfig as AlardLuptonSubtractConfig
from ._task import AlardLuptonSubtractConnections as AlardLuptonSubtractConnections
from ._task import AlardLuptonSubtractTask as AlardLuptonSubtractTask
from ._task import BadSubtractionError as BadSubtractionError
from ._task import InsufficientKernelSourcesError as InsufficientKernelSourcesError
from ._task import NoKernelCandidatesError as NoKernelCandidatesError

PIPELINE: str = _os.path.join(_os.path.dirname(__file__), "pipelines", "subtractImages.yaml")
