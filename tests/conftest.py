import gc
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.utils import REAL_DATA

jax.config.update("jax_enable_x64", True)
# The task's persistent compilation cache, shared by `make test` and `make test-slow` (not the user's cache)
os.environ.setdefault("JAXDIFF_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jaxdiff-xla"))
# jaxdiff.datasets reads the local mirror in place: no test (or notebook kernel, which inherits it) downloads.
os.environ["JAXDIFF_DATA_MIRROR"] = str(REAL_DATA)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's in-memory executables after each test module. Every compiled core program maps about 1700
    memory regions (its kernels' code), and a test worker that kept all of them reached the kernel's limit of
    65530 maps (`vm.max_map_count`): LLVM then fails with "Cannot allocate memory" and the worker aborts. Later
    modules read the programs they share with earlier ones from the persistent cache."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
