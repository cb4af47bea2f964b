"""Exploit and explore strategies: small pure objects that a `PBT` controller calls."""

from poptune.strategies.exploit import Candidate, Exploit, Tournament, Truncation, TTest
from poptune.strategies.explore import (
    Explore,
    ExploreError,
    FunctionExplore,
    Perturb,
    Resample,
    as_explore,
)

__all__ = [
    "Candidate",
    "Exploit",
    "Explore",
    "ExploreError",
    "FunctionExplore",
    "Perturb",
    "Resample",
    "TTest",
    "Tournament",
    "Truncation",
    "as_explore",
]
