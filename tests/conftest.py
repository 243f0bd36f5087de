import os

import jax
import numpy as np
import pytest

from tests.utils import REAL_DATA

jax.config.update("jax_enable_x64", True)
# jaxdiff.datasets reads the local mirror in place: no test (or notebook kernel, which inherits it) downloads.
os.environ["JAXDIFF_DATA_MIRROR"] = str(REAL_DATA)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
