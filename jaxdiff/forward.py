"""Forward modelling on a difference image: fit a point source's flux and position by maximum likelihood.

The model of a stamp of the difference image is flux × P(x − x₀, y − y₀) (+ s·M, optionally, with M the matched
template: a photometric-scale error of the template leaves s·M in the difference), with P the difference
image's PSF shifted to the sub-pixel position by a Fourier phase ramp. The likelihood is Gaussian with the
difference variance plane; the fit runs optax L-BFGS for a fixed number of steps (jit- and vmap-friendly),
and the errors are the Cramér–Rao bounds √diag(F⁻¹), F = Jᵀ V⁻¹ J the Fisher information at the optimum.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax

from ._exposure import Exposure
from ._types import Array, Float


def shifted_psf(psf_image: Float[Array, "k k"], dx, dy, size: int) -> Float[Array, "size size"]:
    """A PSF image on a `size` × `size` stamp, its centre moved by (dx, dy) pixels (band-limited shift).

    Arguments:
        psf_image: odd-sized PSF image, centred, unit sum.
        dx, dy: shift of the centre along x (columns) and y (rows) from the stamp centre, pixels.
        size: odd stamp side; the PSF is cropped or zero-padded to it.

    Returns:
        The shifted PSF (its sum is the cropped PSF's sum: the shift is a Fourier phase ramp).
    """
    k = psf_image.shape[0]
    h, c = size // 2, k // 2
    n = size + k  # room for the wrap-around of the phase ramp
    canvas = jnp.zeros((n, n), psf_image.dtype)
    lo = n // 2 - c
    canvas = lax.dynamic_update_slice(canvas, psf_image, (lo, lo))
    f = jnp.fft.fftfreq(n).astype(psf_image.dtype)
    ramp = jnp.exp(-2j * jnp.pi * (f[:, None] * dy + f[None, :] * dx))
    shifted = jnp.fft.ifft2(jnp.fft.fft2(canvas) * ramp).real
    start = n // 2 - h
    return lax.dynamic_slice(shifted, (start, start), (size, size))


class Stamp(eqx.Module):
    """A square cut-out of the difference image around a source, in parent coordinates."""

    image: Float[Array, "s s"]
    variance: Float[Array, "s s"]
    template: Float[Array, "s s"]  # matched template (zeros when not fitted)
    good: Array  # (s, s) bool: finite pixels with positive variance
    x0: Array  # parent coordinates of the stamp centre pixel
    y0: Array


class PointSourceFit(eqx.Module):
    """Maximum-likelihood point-source parameters and their Cramér–Rao errors.

    Attributes:
        params: (flux, x, y) or (flux, x, y, scale) in difference flux units and parent pixels.
        errors: √diag(F⁻¹), same order.
        covariance: F⁻¹.
        chi2: χ² of the fit over the good stamp pixels.
    """

    params: Float[Array, " p"]
    errors: Float[Array, " p"]
    covariance: Float[Array, "p p"]
    chi2: Float[Array, ""]


def cut_stamp(difference: Exposure, x, y, size: int = 21, matched_template: Exposure | None = None) -> Stamp:
    """The `size` × `size` stamp of a difference exposure centred on the pixel nearest (x, y).

    Arguments:
        difference: the difference exposure (from `jd.subtract` or the task).
        x, y: approximate parent position of the source.
        size: odd stamp side (pixels); the stamp is clamped to stay inside the image.
        matched_template: the result's `matched_template`, needed to fit the template scale.

    Returns:
        A `Stamp`.
    """
    ny, nx = difference.shape
    h = size // 2
    col = jnp.clip(jnp.round(x - difference.xy0[0]).astype(jnp.int32), h, nx - 1 - h)
    row = jnp.clip(jnp.round(y - difference.xy0[1]).astype(jnp.int32), h, ny - 1 - h)

    def cut(a):
        return lax.dynamic_slice(a, (row - h, col - h), (size, size))

    img, var = cut(difference.image), cut(difference.variance)
    good = jnp.isfinite(img) & jnp.isfinite(var) & (var > 0)
    tmpl = jnp.zeros_like(img) if matched_template is None else cut(matched_template.image)
    return Stamp(
        image=jnp.where(good, img, 0.0),
        variance=jnp.where(good, var, 1.0),
        template=jnp.where(good, tmpl, 0.0),
        good=good,
        x0=(col + difference.xy0[0]).astype(img.dtype),
        y0=(row + difference.xy0[1]).astype(img.dtype),
    )


def model(params: Float[Array, " p"], stamp: Stamp, psf_image: Float[Array, "k k"]) -> Float[Array, "s s"]:
    """flux × PSF at (x, y) (+ scale × matched template when `params` has 4 entries) on the stamp."""
    flux, x, y = params[0], params[1], params[2]
    m = flux * shifted_psf(psf_image, x - stamp.x0, y - stamp.y0, stamp.image.shape[0])
    if params.shape[0] == 4:
        m = m + params[3] * stamp.template
    return m


def negative_log_likelihood(params, stamp: Stamp, psf_image) -> Float[Array, ""]:
    """½ χ² of the stamp under the Gaussian likelihood with the difference variance."""
    r = (stamp.image - model(params, stamp, psf_image)) ** 2 / stamp.variance
    return 0.5 * jnp.sum(jnp.where(stamp.good, r, 0.0))


def fisher_information(params, stamp: Stamp, psf_image) -> Float[Array, "p p"]:
    """F = Jᵀ V⁻¹ J, J the Jacobian of the model pixels with respect to the parameters."""
    J = jax.jacfwd(model)(params, stamp, psf_image).reshape(-1, params.shape[0])
    w = jnp.where(stamp.good, 1.0 / stamp.variance, 0.0).reshape(-1)
    return J.T @ (w[:, None] * J)


def fit_point_source(
    stamp: Stamp,
    psf_image: Float[Array, "k k"],
    init: Float[Array, " p"],
    steps: int = 60,
) -> PointSourceFit:
    """Maximise the likelihood of a point source on a difference stamp with optax L-BFGS.

    The parameters are rescaled by Cramér–Rao errors at `init` so that the optimiser sees a well-conditioned
    problem; the loop has a fixed number of steps, so the function jits and vmaps (over stamps and inits).

    Arguments:
        stamp: from `cut_stamp`.
        psf_image: the difference PSF image (`difference.psf.image(x, y)`), odd-sized, unit sum.
        init: starting (flux, x, y) or (flux, x, y, scale); flux in difference units, positions parent pixels.
        steps: L-BFGS iterations (static).

    Returns:
        A `PointSourceFit`.
    """
    init = jnp.asarray(init, stamp.image.dtype)
    F0 = fisher_information(init, stamp, psf_image)
    scale = 1.0 / jnp.sqrt(jnp.clip(jnp.diagonal(F0), 1e-30))

    def loss(u):
        return negative_log_likelihood(init + u * scale, stamp, psf_image)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        u, state = carry
        value, grad = value_and_grad(u, state=state)
        updates, state = opt.update(grad, state, u, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(u, updates), state), None

    u0 = jnp.zeros_like(init)
    (u, _), _ = lax.scan(step, (u0, opt.init(u0)), None, length=steps)
    params = init + u * scale
    cov = jnp.linalg.inv(fisher_information(params, stamp, psf_image))
    return PointSourceFit(
        params=params,
        errors=jnp.sqrt(jnp.diagonal(cov)),
        covariance=cov,
        chi2=2.0 * negative_log_likelihood(params, stamp, psf_image),
    )
