"""The fitted differential background (science minus template), a smooth 2-D polynomial."""

import equinox as eqx
import jax.numpy as jnp

from . import spatial
from ._types import Array, Float, Image


class BackgroundModel(eqx.Module):
    """bg(x, y) = Σ_m c_m g_m(x, y) over the science box.

    Arguments:
        coefficients: c_m, shape (Q,).
        box: (x0, y0, width, height) of the science box.
        order: polynomial order (static).
        model: "chebyshev1" or "polynomial" (static).
    """

    coefficients: Float[Array, " nterm"]
    box: Float[Array, "4"]
    order: int = eqx.field(static=True)
    model: str = eqx.field(static=True, default="chebyshev1")

    def __call__(self, x, y):
        """The background at parent positions (x, y) (any broadcastable shapes)."""
        t = spatial.terms(x, y, self.box, self.order, self.model)
        return jnp.tensordot(self.coefficients, t.astype(self.coefficients.dtype), axes=1)

    def image(self, shape: tuple[int, int], xy0=(0, 0), dtype=None) -> Image:
        """Render the background on an array of `shape` whose element [0, 0] is at parent `xy0`.

        `dtype`: the dtype of the rendered image (default the coefficients'); the per-axis terms are computed
        in the coefficients' precision and only the final outer-product sum runs in `dtype`.
        """
        tx, ty = spatial.separable_terms(self.box, shape, jnp.asarray(xy0), self.order, self.model)
        dtype = self.coefficients.dtype if dtype is None else dtype
        ty = (ty.astype(self.coefficients.dtype) * self.coefficients[:, None]).astype(dtype)
        tx = tx.astype(dtype)
        # a sum of outer products written elementwise: it fuses into its consumer instead of being a matrix
        # product materialised early (an image-sized buffer through the whole subtraction)
        return sum(ty[m][:, None] * tx[m][None, :] for m in range(ty.shape[0]))
