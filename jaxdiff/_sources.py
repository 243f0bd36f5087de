"""`Sources`: a fixed-length list of candidate kernel stars with a validity mask."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._types import Array, Bool, Float, is_concrete, to_jax

_X_COLUMNS = ("x", "slot_Centroid_x", "centroid_x", "xcentroid", "X_IMAGE")
_Y_COLUMNS = ("y", "slot_Centroid_y", "centroid_y", "ycentroid", "Y_IMAGE")
_FLUX_COLUMNS = (
    "flux",
    "slot_PsfFlux_instFlux",
    "slot_ApFlux_instFlux",
    "base_PsfFlux_instFlux",
    "FLUX_AUTO",
)


SOURCE_CAPACITY = 1024
"""Source lists are padded to a multiple of this length (above LSST's 1000 kernel stars)."""


def capacity_for(n: int) -> int:
    """The padded length of a list of `n` sources: the next multiple of `SOURCE_CAPACITY` (at least one)."""
    return max(1, -(-int(n) // SOURCE_CAPACITY)) * SOURCE_CAPACITY


class Sources(eqx.Module):
    """Candidate stars for kernel stamps, in parent-frame pixel coordinates.

    Arguments:
        x, y: positions (column, row), shape (n,).
        flux: optional brightness used to rank stars (NaN: measure on the image).
        valid: which entries are real (False marks padding); all True by default.
    """

    x: Float[Array, " n"]
    y: Float[Array, " n"]
    flux: Float[Array, " n"]
    valid: Bool[Array, " n"]

    def __init__(self, x, y, flux=None, valid=None):
        # concrete lists are assembled with numpy: eager jnp ops would compile a program per list length
        xp = np if is_concrete((x, y, flux, valid)) else jnp
        x = xp.asarray(x)
        y = xp.asarray(y)
        # canonical: float64 positions become float32 without x64 (jnp.result_type would warn about it)
        x = x.astype(jax.dtypes.canonicalize_dtype(np.result_type(x.dtype, np.float32)))
        y = y.astype(x.dtype)
        if x.ndim < 1 or x.shape != y.shape:
            raise ValueError(f"Sources x and y must be 1-D of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
        flux = xp.full(x.shape, np.nan, x.dtype) if flux is None else xp.asarray(flux).astype(x.dtype)
        valid = xp.ones(x.shape, bool) if valid is None else xp.asarray(valid).astype(bool)
        for name, arr in (("flux", flux), ("valid", valid)):
            if arr.shape != x.shape:
                raise ValueError(f"Sources {name} shape {tuple(arr.shape)} does not match x shape {tuple(x.shape)}")
        self.x, self.y, self.flux, self.valid = (to_jax(a) for a in (x, y, flux, valid))

    def __len__(self) -> int:
        return int(self.x.shape[-1])

    def padded(self, capacity: int) -> "Sources":
        """The list padded with invalid entries (at (0, 0), flux 0) to `capacity` along its last axis.

        Traceable; a list already that long is returned as is, a longer one raises `ValueError`.
        """
        n = int(self.x.shape[-1])
        if n == capacity:
            return self
        if n > capacity:
            raise ValueError(f"cannot pad {n} sources to a capacity of {capacity}")
        width = [(0, 0)] * (self.x.ndim - 1) + [(0, capacity - n)]
        xp = np if is_concrete(self) else jnp  # on the host when concrete: no program per list length
        x, y, flux, valid = (xp.asarray(a) for a in (self.x, self.y, self.flux, self.valid))
        return Sources(xp.pad(x, width), xp.pad(y, width), xp.pad(flux, width), xp.pad(valid, width))

    def astype(self, dtype) -> "Sources":
        """The list with positions and fluxes in `dtype` (on the host when concrete); itself when they are.

        The compiled core is specialised on these dtypes, so callers bring lists to one dtype first: a
        float32 list and a float64 one would otherwise compile two programs for the same pair size.
        """
        dtype = np.dtype(dtype)
        if self.x.dtype == dtype and self.flux.dtype == dtype:
            return self
        xp = np if is_concrete(self) else jnp
        return Sources(*(xp.asarray(a).astype(dtype) for a in (self.x, self.y, self.flux)), self.valid)

    @property
    def n_valid(self) -> int:
        return int(np.sum(np.asarray(self.valid)))

    @classmethod
    def from_table(cls, table, capacity: int | None = None) -> "Sources":
        """Build from an astropy Table (or any mapping of columns).

        Positions come from `x`/`y` or LSST's `slot_Centroid_x`/`slot_Centroid_y`; flux from `flux`
        (or LSST's PSF/aperture flux slots) when present. Rows with non-finite positions are marked
        invalid. The list is padded (valid=False) to `capacity` entries, by default to the next multiple of
        `SOURCE_CAPACITY`, so that tables of different lengths give the same shapes (and programs).
        """
        names = list(getattr(table, "colnames", None) or list(table.keys()))

        def pick(options, what, required=True):
            for name in options:
                if name in names:
                    # masked entries (astropy MaskedColumn) become NaN, hence invalid rows
                    return np.ma.filled(np.ma.asarray(table[name], dtype=np.float64), np.nan)
            if required:
                raise ValueError(
                    f"source table has no {what} column; expected one of {', '.join(options)} (has: {names})"
                )
            return None

        x = pick(_X_COLUMNS, "x")
        y = pick(_Y_COLUMNS, "y")
        flux = pick(_FLUX_COLUMNS, "flux", required=False)
        valid = np.isfinite(x) & np.isfinite(y)
        n = x.shape[0]
        capacity = capacity_for(n) if capacity is None else capacity
        if capacity != n:
            if capacity < n:
                raise ValueError(f"capacity {capacity} is smaller than the table's {n} rows")
            pad = capacity - n
            x = np.concatenate([x, np.zeros(pad)])
            y = np.concatenate([y, np.zeros(pad)])
            flux = None if flux is None else np.concatenate([flux, np.full(pad, np.nan)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        x = np.where(valid, x, 0.0)
        y = np.where(valid, y, 0.0)
        return cls(x, y, flux, valid)
