"""Kernel bases: Alard–Lupton Gaussian × monomial images and delta functions (ALGORITHM §5)."""

from ._alard_lupton import BASIS_MODES as BASIS_MODES
from ._alard_lupton import alard_lupton as alard_lupton
from ._alard_lupton import alard_lupton_factors as alard_lupton_factors
from ._alard_lupton import alard_lupton_widths as alard_lupton_widths
from ._alard_lupton import alard_lupton_widths_traced as alard_lupton_widths_traced
from ._alard_lupton import combine as combine
from ._alard_lupton import kernel_size as kernel_size
from ._alard_lupton import x_factor_groups as x_factor_groups
from ._delta import LAPLACIAN_STENCIL as LAPLACIAN_STENCIL
from ._delta import delta_function as delta_function
from ._delta import regularization_matrix as regularization_matrix
from ._normalise import SUM_TOLERANCE as SUM_TOLERANCE
from ._normalise import normalisation_matrix as normalisation_matrix
from ._normalise import normalise as normalise
