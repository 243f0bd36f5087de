"""Domain exceptions and the status codes returned by the traced core."""

import enum


class UnsupportedModeError(ValueError, RuntimeError):
    """`config.mode` is not one of the allowed values."""


class NoWorkFound(RuntimeError):
    """Not enough of the science image is covered by the template to do anything useful."""


class InsufficientKernelSourcesError(RuntimeError):
    """Fewer usable kernel stars than `config.min_kernel_sources`."""

    def __init__(self, n_sources: int, n_required: int):
        self.n_sources = int(n_sources)
        self.n_required = int(n_required)
        super().__init__(
            f"only {self.n_sources} usable kernel sources, {self.n_required} required (sources must lie "
            "inside the stamp box and be free of excluded mask planes and non-finite pixels)"
        )

    def __reduce__(self):
        return (type(self), (self.n_sources, self.n_required))


class NoKernelCandidatesError(RuntimeError):
    """No kernel stamp survived the rejection loop."""


class SpatialOrderWarning(UserWarning):
    """The surviving kernel stamps cannot determine the configured spatial orders (too few of them, or positions
    along one line): the fit used lower ones (the metadata's `spatial_kernel_order_used` and
    `spatial_bg_order_used`)."""


class BadSubtractionError(RuntimeError):
    """The difference keeps too much of the science sources' flux (ip_diffim's `BadSubtractionError`): raised
    only when `config.raise_on_bad_subtraction_ratio` is set."""

    def __init__(self, ratio: float, threshold: float, what: str = "mean"):
        self.ratio = float(ratio)
        self.threshold = float(threshold)
        self.what = what
        super().__init__(
            f"bad subtraction: the {what} ratio of |difference| to |science| in source footprints is "
            f"{self.ratio:.3g}, above the threshold {self.threshold:.3g} (check the kernel fit and inputs, or raise "
            "bad_subtraction_ratio_threshold / bad_subtraction_variation_threshold)"
        )

    def __reduce__(self):
        return (type(self), (self.ratio, self.threshold, self.what))


class RESULTS(enum.IntEnum):
    """Status of the traced core; the shell turns a failure into an exception."""

    successful = 0
    insufficient_sources = 1
    no_candidates = 2
    nonfinite_solution = 3
    no_work = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    RESULTS.successful: "success",
    RESULTS.insufficient_sources: "too few usable kernel sources",
    RESULTS.no_candidates: "no kernel candidate survived rejection",
    RESULTS.nonfinite_solution: "the kernel solution is not finite",
    RESULTS.no_work: "the template covers less of the science image than required_template_fraction",
}
