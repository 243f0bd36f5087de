"""Pictures of a subtraction.

`diagnostic_figure` draws one page: the science, the template over the science box and the difference; the
matching kernel at a 3 × 3 grid of positions; the histogram of difference/√variance against a unit Gaussian;
and the run's metadata. `jaxdiff subtract --plot` and `jaxdiff demo` write the same page. matplotlib is
imported when a figure is made, not with jaxdiff.
"""

from ._plot import diagnostic_figure as diagnostic_figure
from ._plot import save_figure as save_figure

__all__ = ["diagnostic_figure", "save_figure"]
