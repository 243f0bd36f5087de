"""The package as installed: one version, package data present, extras declared; the built wheel's file list."""

import os
import zipfile
from importlib import metadata, resources

import pytest

import jaxdiff

PACKAGE_DATA = ["py.typed", "lsst/pipelines/subtractImages.yaml", "data/registry.txt"]


def test_version_is_single_sourced():
    assert metadata.version("jaxdiff") == jaxdiff.__version__
    assert jaxdiff.__version__.count(".") == 2


@pytest.mark.parametrize("name", PACKAGE_DATA)
def test_package_data_is_installed(name):
    assert resources.files("jaxdiff").joinpath(name).is_file()


def test_extras_are_declared():
    meta = metadata.metadata("jaxdiff")
    assert {"lsst", "dask", "docs", "test"} <= set(meta.get_all("Provides-Extra"))
    lsst = [r for r in meta.get_all("Requires-Dist") if 'extra == "lsst"' in r]
    assert any(r.startswith("lsst-pipe-base") for r in lsst), lsst
    assert any(r.startswith("pooch") and "extra" not in r for r in meta.get_all("Requires-Dist"))
    assert meta["License-Expression"] == "MIT"


@pytest.mark.skipif(not os.environ.get("JAXDIFF_WHEEL"), reason="JAXDIFF_WHEEL (set by `make test-wheel`) not set")
def test_wheel_ships_package_data_and_every_module():
    names = set(zipfile.ZipFile(os.environ["JAXDIFF_WHEEL"]).namelist())
    for name in PACKAGE_DATA:
        assert f"jaxdiff/{name}" in names
    installed = {
        f"jaxdiff/{p.relative_to(resources.files('jaxdiff'))}"
        for p in resources.files("jaxdiff").rglob("*.py")  # the installed package: what the tests import
    }
    assert {"jaxdiff/__init__.py", "jaxdiff/datasets.py", "jaxdiff/lsst/_task.py"} <= installed
    assert installed <= names
    version = jaxdiff.__version__
    assert f"jaxdiff-{version}.dist-info/licenses/LICENSE" in names
    assert f"jaxdiff-{version}.dist-info/entry_points.txt" in names
