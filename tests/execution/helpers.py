"""Helpers shared by the executor tests."""

from __future__ import annotations

from pathlib import Path

import poptune as pt
from poptune.execution.source import load_experiment

WORKLOADS = str(Path(__file__).with_name("workloads.py"))
SOURCE = f"{WORKLOADS}:counter"


def experiment() -> pt.Experiment:
    """The experiment the environment describes, loaded as worker processes load it."""
    return load_experiment(SOURCE)[0]


def check_complete(result: pt.Result, steps: int, population: int) -> None:
    """Every member that did not fail finished all its steps, and none is missing."""
    alive = [m for m in result.members if m.status != "failed"]
    assert len(alive) == population
    assert all(m.status == "finished" and m.step == steps for m in alive), result.members
