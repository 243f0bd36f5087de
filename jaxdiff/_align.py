"""Templates on another pixel grid: resample onto the science image's WCS with `reproject` (`jaxdiff subtract
--align`, `jaxdiff.align_template`).

What is approximated:

- Bilinear interpolation (`reproject.reproject_interp`, order 1) smooths the template: each output pixel is
  Σ wᵢ Tᵢ over its four nearest input pixels. Its variance is Σ wᵢ² Vᵢ and neighbouring output pixels are
  correlated. The variance plane written here is Σ wᵢ Vᵢ (the variance plane resampled like the image): right
  for the noise of sums over many pixels (PSF photometry, the matched-filter detection), but up to 2× the
  variance of single pixels (1.5× on average). The correlation itself is not modelled (no covariance plane),
  so the decorrelation (§11) treats the resampled template's noise as white, and the variance rescaling (§4.1)
  of the template measures single-pixel noise (expect a template factor near 0.7 after a non-integer shift).
- The template PSF is kept as it was (not rotated nor broadened by the interpolation's ~0.3 px smoothing); the
  kernel fit matches the images as they are, so this only affects the mode choice and the basis widths.
- Mask planes: an output pixel gets every plane set in any input pixel contributing to it; pixels the
  template does not cover (or whose value is not finite) are NO_DATA with image 0 and variance 1.
"""

import numpy as np

from ._exposure import Exposure
from ._mask import plane_bit


def _celestial(wcs, what: str):
    if wcs is None:
        raise ValueError(
            f"the {what} has no WCS; --align needs a celestial WCS (CTYPE1/2, CRVAL, CRPIX, CD or CDELT) in both "
            "FITS headers"
        )
    if not getattr(wcs, "has_celestial", False):
        raise ValueError(f"the {what} WCS has no celestial axes (CTYPE {list(getattr(wcs.wcs, 'ctype', []))})")
    try:
        wcs.pixel_to_world_values(0.0, 0.0)
    except Exception as err:  # noqa: BLE001 - astropy/wcslib raise many types for broken headers
        raise ValueError(f"the {what} WCS cannot be evaluated ({type(err).__name__}: {err})") from err
    return wcs.celestial


def align_template(template: Exposure, science: Exposure) -> Exposure:
    """The template resampled onto the science exposure's pixel grid (its WCS, shape and xy0).

    Arguments:
        template, science: exposures with celestial WCSs (`Exposure.wcs`), e.g. from `jd.read_exposure`.

    Returns:
        A template `Exposure` on the science grid: image and variance resampled bilinearly, mask planes
        spread to the pixels they touch, NO_DATA where the template does not cover; PSF, photo_calib and
        the science WCS kept (see the module docstring for what is approximated).

    Raises:
        ValueError: a missing, non-celestial or broken WCS, or no overlap at all.
    """
    try:
        from reproject import reproject_interp
    except ImportError as err:  # pragma: no cover - reproject is a dependency
        raise ValueError("aligning templates needs the reproject package (pip install reproject)") from err
    w_t = _celestial(template.wcs, "template")
    w_s = _celestial(science.wcs, "science")
    shape = science.shape
    img = np.asarray(template.image, np.float64)
    var = np.asarray(template.variance, np.float64)
    mask = np.asarray(template.mask)

    def resample(data):
        out, footprint = reproject_interp((data, w_t), w_s, shape_out=shape, order="bilinear")
        return out, footprint

    try:
        image, footprint = resample(img)
        variance, _ = resample(var)
    except Exception as err:  # noqa: BLE001 - reproject/astropy errors on inconsistent WCSs
        raise ValueError(f"resampling the template onto the science WCS failed ({type(err).__name__}: {err})") from err
    covered = (footprint > 0) & np.isfinite(image) & np.isfinite(variance)
    if not covered.any():
        raise ValueError("the template does not overlap the science image on the sky (check both WCSs)")
    out_mask = np.zeros(shape, np.int32)
    for _, bit in template.mask_planes:
        plane = ((mask >> bit) & 1).astype(np.float64)
        if plane.any():
            spread, _ = resample(plane)
            out_mask |= np.where(np.nan_to_num(spread) > 0, 1 << bit, 0).astype(np.int32)
    nd = plane_bit(template.mask_planes, "NO_DATA")
    if nd is None:
        raise ValueError("the template's mask has no NO_DATA plane to flag uncovered pixels in")
    out_mask |= np.where(covered, 0, 1 << nd).astype(np.int32)
    dtype = np.asarray(template.image).dtype
    return Exposure(
        np.where(covered, image, 0.0).astype(dtype),
        np.where(covered, np.maximum(variance, 0.0), 1.0).astype(dtype),
        out_mask,
        psf=template.psf,
        xy0=science.xy0,
        photo_calib=template.photo_calib,
        wcs=science.wcs,
        mask_planes=template.mask_planes,
    )
