"""`SpatialKernel`: the fitted, spatially varying PSF-matching kernel."""

import equinox as eqx
import jax.numpy as jnp

from . import spatial
from ._types import Array, Basis, Float, Kernel, Scalar


class SpatialKernel(eqx.Module):
    """K(x, y) = Σ_b Σ_j a[b, j] f_j(x, y) B_b, with f_j the spatial terms over the science box.

    Arguments:
        basis: basis images B_b, shape (n, k, k), k odd; B_0 sums to 1, the others to 0.
        coefficients: a[b, j], shape (n, P); a[0, j>0] = 0 so the kernel sum is a[0, 0] everywhere.
        box: (x0, y0, width, height) of the science box the terms are normalised over.
        order: spatial order of the kernel variation (static).
        model: "chebyshev1" or "polynomial" (static).
    """

    basis: Basis
    coefficients: Float[Array, "n nterm"]
    box: Float[Array, "4"]
    order: int = eqx.field(static=True)
    model: str = eqx.field(static=True, default="chebyshev1")

    @property
    def size(self) -> int:
        return int(self.basis.shape[-1])

    def components(self) -> Float[Array, "nterm k k"]:
        """The kernel of each spatial term, K′_j = Σ_b a[b, j] B_b (shape (P, k, k))."""
        return jnp.einsum("bj,bvu->jvu", self.coefficients, self.basis)

    def image(self, x=None, y=None) -> Kernel:
        """The kernel image at parent position (x, y) (box centre when omitted), applied by convolution."""
        x0, y0, w, h = self.box
        x = x0 + (w - 1) / 2 if x is None else x
        y = y0 + (h - 1) / 2 if y is None else y
        f = spatial.terms(x, y, self.box, self.order, self.model)
        return jnp.einsum("j,jvu->vu", f.astype(self.coefficients.dtype), self.components())

    def kernel_sum(self, x=None, y=None) -> Scalar:
        """Sum of the kernel at (x, y): the photometric scale from the convolved to the matched image."""
        return jnp.sum(self.image(x, y))
