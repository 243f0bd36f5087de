"""The result Module returned by `jd.subtract` and the task."""

from typing import Any

import equinox as eqx

from ._background import BackgroundModel
from ._exposure import Exposure
from ._kernel import SpatialKernel


class SubtractResult(eqx.Module):
    """Outputs of a subtraction.

    Attributes:
        difference: the difference image on the science box (science minus template).
        matched_template: the template as subtracted.
        background_model: the fitted differential background (science minus template).
        psf_matching_kernel: the fitted `SpatialKernel`.
        metadata: 0-d arrays from `jd.subtract`; plain Python values from the task.
    """

    difference: Exposure
    matched_template: Exposure
    background_model: BackgroundModel
    psf_matching_kernel: SpatialKernel
    metadata: dict[str, Any]
