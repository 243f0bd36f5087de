"""jaxdiff.lsst: external calibrations (finalizedPsfApCorrCatalog) and the quality figures, in process and
through a butler (skipped without `jaxdiff[lsst]`)."""

import numpy as np
import pytest

try:
    import lsst.images  # noqa: F401
    import lsst.pipe.base  # noqa: F401
except ImportError as err:
    pytest.skip(f"LSST middleware not installed ({err})", allow_module_level=True)

import lsst.pipe.base.connectionTypes as cT  # noqa: E402
from astropy.table import Table  # noqa: E402
from lsst.daf.butler import Butler, Config, DatasetType  # noqa: E402
from lsst.images.fields import ChebyshevField  # noqa: E402
from lsst.images.psfs import GaussianPointSpreadFunction  # noqa: E402
from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor  # noqa: E402
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d  # noqa: E402
from test_lsst import DATA_ID, INSTRUMENT, make_visit_image  # noqa: E402

import jaxdiff as jd  # noqa: E402
import jaxdiff.lsst as jl  # noqa: E402

SCIENCE_SIGMA = 2.2  # the true science PSF; the science image carries a preliminary 1.8


@pytest.fixture(scope="module")
def inputs():
    sim = jd.sim.simulate_pair((160, 160), seed=3, n_stars=60, template_sigma=1.6, science_sigma=2.2, xy0=(5, 7))
    template = make_visit_image(sim.template, 1.6)
    science = make_visit_image(sim.science, 1.8)
    valid = np.asarray(sim.sources.valid)
    sources = Table({"x": np.asarray(sim.sources.x)[valid], "y": np.asarray(sim.sources.y)[valid]})
    ap_corr = {"base_PsfFlux_instFlux": ChebyshevField(science.bbox, np.array([[0.97]]))}
    catalog = {
        0: {"psf": GaussianPointSpreadFunction(SCIENCE_SIGMA, science.bbox, 25), "aperture_corrections": ap_corr}
    }
    # what the task must reproduce: the science with the catalogue's PSF, subtracted directly
    right = make_visit_image(sim.science, SCIENCE_SIGMA)
    direct = jd.AlardLuptonSubtract().run(jl.to_exposure(template), jl.to_exposure(right), jl.to_sources(sources))
    return template, science, sources, catalog, direct


def test_catalogue_replaces_the_science_psf(inputs):
    template, science, sources, catalog, direct = inputs
    task = jl.AlardLuptonSubtractTask()
    out = task.run(template, science, sources, finalizedPsfApCorrCatalog=catalog)
    np.testing.assert_array_equal(out.difference.image.array, np.asarray(direct.difference.image, np.float32))
    md = task.getFullMetadata()["alardLuptonSubtract"]
    assert md["sciencePsfSize"] == pytest.approx(2.3548 * SCIENCE_SIGMA, rel=1e-3)
    assert out.difference.psf is catalog[0]["psf"]
    assert out.difference.aperture_corrections.keys() == {"base_PsfFlux_instFlux"}
    assert science.psf.compute_kernel_image(x=80, y=80).array.shape == (25, 25)  # the input is untouched
    assert abs(jl.to_exposure(science).psf.sigma() - 1.8) < 0.05
    # without the catalogue the preliminary PSF gives another subtraction
    plain = jl.AlardLuptonSubtractTask().run(template, science, sources)
    assert not np.array_equal(plain.difference.image.array, out.difference.image.array)
    # quality figures under ip_diffim's keys
    for key in ("differenceFootprintRatioMean", "scienceLimitingMagnitude", "diffimLimitingMagnitude"):
        assert np.isfinite(md[key]), key
    assert md["fitRegion"] == "stamps"
    with pytest.raises(LookupError, match="no row for detector 0"):
        task.run(template, science, sources, finalizedPsfApCorrCatalog={5: catalog[0]})


def test_config_maps_the_new_fields():
    config = jl.AlardLuptonSubtractConfig()
    assert config.toSubtractConfig() == jd.SubtractConfig()
    config.allowKernelSourceDetection = True
    config.raiseOnBadSubtractionRatio = True
    config.badSubtractionRatioThreshold = 0.1
    config.fitRegion = "image"
    sc = config.toSubtractConfig()
    assert sc.allow_kernel_source_detection and sc.raise_on_bad_subtraction_ratio
    assert (sc.bad_subtraction_ratio_threshold, sc.fit_region) == (0.1, "image")
    names = jl.AlardLuptonSubtractConnections(config=jl.AlardLuptonSubtractConfig()).inputs
    assert "finalizedPsfApCorrCatalog" not in names
    config.doApplyExternalCalibrations = True
    assert "finalizedPsfApCorrCatalog" in jl.AlardLuptonSubtractConnections(config=config).inputs


def test_bad_subtraction_is_an_algorithm_error(inputs):
    template, science, sources, catalog, direct = inputs
    config = jl.AlardLuptonSubtractConfig()
    config.raiseOnBadSubtractionRatio = True
    config.badSubtractionRatioThreshold = direct.metadata["difference_footprint_ratio_mean"] - 0.01
    task = jl.AlardLuptonSubtractTask(config=config)
    with pytest.raises(jl.BadSubtractionError) as info:
        task.run(template, science, sources, finalizedPsfApCorrCatalog=catalog)
    assert isinstance(info.value, lsst.pipe.base.AlgorithmError)
    assert info.value.metadata["threshold"] == config.badSubtractionRatioThreshold


# The production connection reads an afw `ExposureCatalog`; afw is not installed here, so the butler test stores
# the duck-typed form `jaxdiff.lsst` also reads (detector id → row with `psf`, `aperture_corrections`) as a pickled
# dict under a storage class of its own, through a task whose only change is that connection's storage class.
CATALOG_STORAGE = "JaxdiffTestCalibrationCatalog"


class _Connections(jl.AlardLuptonSubtractConnections, dimensions=("instrument", "visit", "detector")):
    finalizedPsfApCorrCatalog = cT.Input(
        doc="Calibration catalogue stand-in (pickled dict).",
        name="finalized_psf_ap_corr_catalog",
        storageClass=CATALOG_STORAGE,
        dimensions=("instrument", "visit"),
    )


class _Config(jl.AlardLuptonSubtractConfig, pipelineConnections=_Connections):
    pass


class _Task(jl.AlardLuptonSubtractTask):
    ConfigClass = _Config


def _make_repo(root, template, science, sources, catalog):
    config = Config(
        {
            "storageClasses": {CATALOG_STORAGE: {"pytype": "dict"}},
            "datastore": {"formatters": {CATALOG_STORAGE: "lsst.daf.butler.formatters.pickle.PickleFormatter"}},
        }
    )
    Butler.makeRepo(root, config=config)
    butler = Butler.from_config(root, writeable=True, run="inputs")
    reg = butler.registry
    reg.insertDimensionData("instrument", {"name": INSTRUMENT, "detector_max": 4, "visit_max": 100})
    reg.insertDimensionData("physical_filter", {"instrument": INSTRUMENT, "name": "r_dummy", "band": "r"})
    reg.insertDimensionData("day_obs", {"instrument": INSTRUMENT, "id": 20250101})
    reg.insertDimensionData("detector", {"instrument": INSTRUMENT, "id": 0, "full_name": "det0"})
    reg.insertDimensionData(
        "visit",
        {"instrument": INSTRUMENT, "id": 1, "name": "visit1", "physical_filter": "r_dummy", "day_obs": 20250101},
    )
    corners = [(149.99, 1.99), (150.01, 1.99), (150.01, 2.01), (149.99, 2.01)]
    region = ConvexPolygon([UnitVector3d(LonLat.fromDegrees(a, d)) for a, d in corners])
    reg.insertDimensionData("visit_detector_region", {**DATA_ID, "region": region})
    config = _Config()
    config.doApplyExternalCalibrations = True
    connections = _Connections(config=config)
    values = dict(template=template, science=science, sources=sources, finalizedPsfApCorrCatalog=catalog)
    for conn, value in values.items():
        c = getattr(connections, conn)
        reg.registerDatasetType(DatasetType(c.name, c.dimensions, c.storageClass, universe=butler.dimensions))
        data_id = {k: v for k, v in DATA_ID.items() if k in c.dimensions}
        butler.put(value, c.name, data_id)


def test_butler_applies_the_catalogue(tmp_path, inputs):
    template, science, sources, catalog, direct = inputs
    root = str(tmp_path / "repo")
    _make_repo(root, template, science, sources, catalog)
    config = _Config()
    config.doApplyExternalCalibrations = True
    out = SimplePipelineExecutor.prep_butler(root, inputs=["inputs"], output="out/ext")
    spe = SimplePipelineExecutor.from_task_class(
        _Task, config=config, label="subtractImages", butler=out, where="detector = 0"
    )
    assert len(spe.run(register_dataset_types=True)) == 1
    butler = Butler.from_config(root, collections=["out/ext"])
    diff = butler.get("difference_image_predetection", DATA_ID)
    np.testing.assert_array_equal(diff.image.array, np.asarray(direct.difference.image, np.float32))
    assert "base_PsfFlux_instFlux" in diff.aperture_corrections
    md = butler.get("subtractImages_metadata", DATA_ID)["subtractImages"]
    assert md["sciencePsfSize"] == pytest.approx(2.3548 * SCIENCE_SIGMA, rel=1e-3)
    assert "applyExternalCalibrationsEndCpuTime" in md
