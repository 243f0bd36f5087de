"""Simulated image pairs with known PSFs, sky, noise and transients (see `jaxdiff._sim`)."""

from ._sim import SimulatedPair, Truth, reference_pair, simulate_pair

__all__ = ["SimulatedPair", "Truth", "reference_pair", "simulate_pair"]
