"""Simulated image pairs with known PSFs, sky, noise and transients (see `jaxdiff._sim`)."""

from ._sim import SimulatedPair, Truth, reference_pair, simulate_pair
from ._sim_cutouts import SimulatedCutouts, simulate_cutouts

__all__ = ["SimulatedCutouts", "SimulatedPair", "Truth", "reference_pair", "simulate_cutouts", "simulate_pair"]
