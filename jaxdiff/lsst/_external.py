"""External calibrations (ip_diffim's `doApplyExternalCalibrations`): the science PSF and aperture corrections
replaced by the row of a per-visit calibration catalogue (`finalizedPsfApCorrCatalog` / visit summary) for the
science image's detector."""

from collections.abc import Mapping

from lsst.images import VisitImage
from lsst.images.psfs import PointSpreadFunction


class ExternalCalibrationError(LookupError):
    """The calibration catalogue has no usable row for the science image's detector."""


def _field(row, *names):
    """The first of `names` the row has: a mapping key, an attribute, or an afw-style getter (`getPsf`)."""
    for name in names:
        if isinstance(row, Mapping) and name in row:
            return row[name]
        if hasattr(row, name):
            return getattr(row, name)
        getter = "get" + name[0].upper() + name[1:]
        if hasattr(row, getter):
            return getattr(row, getter)()
    return None


def catalog_row(catalog, detector: int):
    """The row of `catalog` for `detector`: an afw `ExposureCatalog` (`find(id)`), a mapping keyed by detector
    id, or a sequence of rows with an `id` (afw records: `getId()`)."""
    if hasattr(catalog, "find"):
        row = catalog.find(detector)
    elif isinstance(catalog, Mapping):
        row = catalog.get(detector, catalog.get(str(detector)))
    else:
        row = next((r for r in catalog if _field(r, "id", "detector") == detector), None)
    if row is None:
        raise ExternalCalibrationError(
            f"the external calibration catalogue has no row for detector {detector}; "
            "set doApplyExternalCalibrations=False or give the catalogue for this visit"
        )
    return row


def apply_external_calibration(science: VisitImage, catalog) -> VisitImage:
    """A copy of `science` with the PSF and aperture corrections of its detector's catalogue row.

    Arguments:
        science: the science `VisitImage` (its `detector.id` selects the row).
        catalog: see `catalog_row`; a row holds `psf` (an `lsst.images` PSF, or an afw PSF converted with
            `PointSpreadFunction.from_legacy`) and optionally `aperture_corrections` (or afw's `apCorrMap`).

    Returns:
        The new `VisitImage`; `science` is not modified.
    """
    row = catalog_row(catalog, science.detector.id)
    psf = _field(row, "psf")
    if psf is None:
        raise ExternalCalibrationError(f"the calibration row for detector {science.detector.id} has no PSF")
    if not isinstance(psf, PointSpreadFunction):
        psf = PointSpreadFunction.from_legacy(psf, science.bounds)
    ap_corr = _field(row, "aperture_corrections", "apCorrMap")
    if ap_corr is not None and not isinstance(ap_corr, Mapping):
        from lsst.images.aperture_corrections import aperture_corrections_from_legacy

        ap_corr = aperture_corrections_from_legacy(ap_corr)
    out = science.copy()
    out.psf = psf
    if ap_corr is not None:
        out.aperture_corrections.clear()
        out.aperture_corrections.update(ap_corr)
    return out
