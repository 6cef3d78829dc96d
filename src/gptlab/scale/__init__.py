"""Scaling-law experiments: fits with uncertainty (:mod:`gptlab.scale.fit`)."""

from .fit import Fit, fit_chinchilla, fit_power_law, isoflop_profile

__all__ = ["Fit", "fit_chinchilla", "fit_power_law", "isoflop_profile"]
