"""Conversion between `lsst.images` types and jaxdiff's `Exposure`, `SpatialKernel` and `Sources`."""

import warnings

import astropy.table
import numpy as np
from lsst.images import (
    Box,
    Image,
    Mask,
    MaskPlane,
    MaskSchema,
    VisitImage,
    get_legacy_difference_image_mask_planes,
)
from lsst.images.convolution_kernels import ImageBasisConvolutionKernel
from lsst.images.fields import ChebyshevField
from numpy.polynomial import chebyshev

from .. import spatial
from .._exposure import Exposure
from .._kernel import SpatialKernel
from .._mask import MASK_PLANES, add_planes
from .._psf import ImagePsf
from .._sources import Sources

# jaxdiff (legacy afw) plane name -> lsst.images MaskPlane (new name and description)
_LEGACY_PLANES: dict[str, MaskPlane] = dict(get_legacy_difference_image_mask_planes())
LEGACY_TO_NEW: dict[str, str] = {old: plane.name for old, plane in _LEGACY_PLANES.items()}
NEW_TO_LEGACY: dict[str, str] = {new: old for old, new in LEGACY_TO_NEW.items()}


def legacy_name(name: str) -> str:
    """The jaxdiff (afw) name of an `lsst.images` mask plane; unknown names are kept."""
    return NEW_TO_LEGACY.get(name, name)


def images_name(name: str) -> str:
    """The `lsst.images` name of a jaxdiff (afw) mask plane; unknown names are kept."""
    return LEGACY_TO_NEW.get(name, name)


def _psf_image(psf, bbox: Box) -> ImagePsf | None:
    """The PSF kernel image at the centre of `bbox`, as a unit-sum, odd-sized `jd.ImagePsf`."""
    if psf is None:
        return None
    x = (bbox.x.start + bbox.x.stop - 1) // 2
    y = (bbox.y.start + bbox.y.stop - 1) // 2
    kimg = psf.compute_kernel_image(x=x, y=y)
    arr = np.asarray(kimg.array, dtype=np.float64)
    # centre the stamp on pixel (0, 0) of the kernel image and make it square and odd-sized
    kb = kimg.bbox
    h = min(-kb.x.start, kb.x.stop - 1, -kb.y.start, kb.y.stop - 1)
    arr = arr[-kb.y.start - h : -kb.y.start + h + 1, -kb.x.start - h : -kb.x.start + h + 1]
    return ImagePsf(arr / arr.sum())


def _fits_wcs(image: VisitImage):
    """The image's FITS WCS (array-index pixel frame) when it has one, else None."""
    projection = image.sky_projection
    if projection is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return image.fits_wcs
        except Exception:  # noqa: BLE001 - no exact FITS form: try the approximation
            approx = projection.fits_approximation
            return None if approx is None else approx.as_fits_wcs(image.bbox)


def to_exposure(image: VisitImage, dtype=None) -> Exposure:
    """A `jd.Exposure` from an `lsst.images.VisitImage` (or `DifferenceImage`).

    Pixels and variance are copied (optionally cast to `dtype`), the origin becomes `xy0`, each mask
    plane is mapped by name to jaxdiff's bit table (SATURATED→SAT, INTERPOLATED→INTRP, COSMIC_RAY→CR,
    DETECTION_EDGE→EDGE, …; unknown planes get free bits under their own names), the PSF is the
    kernel image evaluated at the centre of the box (`jd.ImagePsf`) and the WCS is the FITS form of
    the sky projection (None when there is none).

    Arguments:
        image: the `lsst.images` image.
        dtype: pixel dtype of the result (the image's own dtype by default).

    Returns:
        The `jd.Exposure`.
    """
    arr = np.asarray(image.image.array, dtype=dtype)
    var = np.asarray(image.variance.array, dtype=arr.dtype)
    names = [n for n in image.mask.schema.names if n is not None]
    table = add_planes(tuple(MASK_PLANES.items()), [legacy_name(n) for n in names])
    planes = dict(table)
    bits = np.zeros(arr.shape, np.int32)
    for name in names:
        bits |= image.mask.get(name).astype(np.int32) << planes[legacy_name(name)]
    return Exposure(
        arr,
        var,
        bits,
        psf=_psf_image(image.psf, image.bbox),
        xy0=(image.bbox.x.start, image.bbox.y.start),
        wcs=_fits_wcs(image),
        mask_planes=table,
    )


def _lsst_mask(exposure: Exposure, bbox: Box) -> Mask:
    planes = [
        _LEGACY_PLANES.get(name, MaskPlane(images_name(name), "Mask plane set by jaxdiff."))
        for name, _ in exposure.mask_planes
    ]
    mask = Mask(0, schema=MaskSchema(planes, dtype=np.uint8), bbox=bbox)
    bits = np.asarray(exposure.mask)
    for (_, bit), plane in zip(exposure.mask_planes, planes, strict=True):
        mask.set(plane.name, (bits >> bit) & 1 != 0)
    return mask


def from_exposure(
    exposure: Exposure, like: VisitImage, *, cls=VisitImage, psf=None, dtype=None, **kwargs
) -> VisitImage:
    """An `lsst.images` image (`cls`: `VisitImage` or `DifferenceImage`) holding an `Exposure`'s pixels.

    What an `Exposure` does not carry (sky projection, observation info, detector, band, unit) comes
    from `like`; so does the PSF unless `psf` is given.

    Arguments:
        exposure: the jaxdiff exposure.
        like: the `lsst.images` image to take the metadata from.
        cls: the class to build.
        psf: an `lsst.images` PSF to attach instead of `like.psf`.
        dtype: pixel dtype (`like`'s by default).
        kwargs: further constructor arguments of `cls` (e.g. `kernel=` for a `DifferenceImage`).

    Returns:
        The new image, on `exposure`'s box.
    """
    dtype = like.image.array.dtype if dtype is None else dtype
    x0, y0, _, _ = exposure.bbox
    bbox = Box.from_shape(exposure.shape, start=(y0, x0))
    unit = like.unit
    return cls(
        Image(np.asarray(exposure.image, dtype=dtype), bbox=bbox, unit=unit),
        mask=_lsst_mask(exposure, bbox),
        variance=Image(np.asarray(exposure.variance, dtype=dtype), bbox=bbox, unit=None if unit is None else unit**2),
        sky_projection=like.sky_projection,
        obs_info=like.obs_info,
        psf=like.psf if psf is None else psf,
        detector=like.detector,
        band=like.band,
        **kwargs,
    )


def _to_chebyshev(order: int, model: str) -> np.ndarray:
    """M[a, i]: the 1-D order-`i` spatial polynomial of `model` as Σ_a M[a, i] T_a."""
    if model == "chebyshev1":
        return np.eye(order + 1)
    m = np.zeros((order + 1, order + 1))
    for i in range(order + 1):
        m[: i + 1, i] = chebyshev.poly2cheb(np.eye(order + 1)[i])[: i + 1]
    return m


def kernel_to_lsst(kernel: SpatialKernel) -> ImageBasisConvolutionKernel:
    """The PSF-matching kernel as an `lsst.images` `ImageBasisConvolutionKernel`.

    One basis image per spatial term (the term's kernel component) with a `ChebyshevField` over the
    fitted box; the images are rotated by 180° because afw applies kernels as correlations while
    jaxdiff convolves.

    Arguments:
        kernel: the fitted `jd.SpatialKernel`.

    Returns:
        The `lsst.images` kernel; `compute_kernel_image(x=, y=)` equals `kernel.image(x, y)[::-1, ::-1]`.
    """
    comps = np.asarray(kernel.components(), dtype=np.float64)[:, ::-1, ::-1].copy()
    x0, y0, w, h = (int(round(float(v))) for v in np.asarray(kernel.box))
    bbox = Box.from_shape((h, w), start=(y0, x0))
    m = _to_chebyshev(kernel.order, kernel.model)
    fields = []
    for i, j in spatial.exponents(kernel.order):
        # x^i y^j (or T_i(x) T_j(y)) in Chebyshev form; element [p, q] multiplies T_p(y) T_q(x)
        fields.append(ChebyshevField(bbox, np.outer(m[:, j], m[:, i])))
    return ImageBasisConvolutionKernel(comps, fields)


def to_sources(table) -> Sources:
    """`jd.Sources` from an astropy table with `x`/`y` or `slot_Centroid_x`/`slot_Centroid_y` columns."""
    return Sources.from_table(table)


def sources_table(sources: Sources) -> astropy.table.Table:
    """The valid rows of `jd.Sources` as an astropy table (`x`, `y`, and `flux` when known)."""
    valid = np.asarray(sources.valid, dtype=bool) if len(sources) else np.zeros(0, bool)
    cols = {"x": np.asarray(sources.x, np.float64)[valid], "y": np.asarray(sources.y, np.float64)[valid]}
    if sources.flux is not None:
        cols["flux"] = np.asarray(sources.flux, np.float64)[valid]
    return astropy.table.Table(cols)
