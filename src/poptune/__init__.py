"""poptune: Population Based Training that is correct, fast, persistent and resumable.

Example:
    >>> import poptune as pt
    >>> def init(hp, seed): return 0.0
    >>> def step(x, hp): return x + hp["lr"], x + hp["lr"]
    >>> exp = pt.Experiment(pt.trainable(init, step), {"lr": pt.Float(0.1, 1.0)},
    ...                     population_size=4, steps=20, interval=5)
    >>> exp.run().best.step
    20
"""

from typing import TYPE_CHECKING

from poptune.controller import PBT, Decision, MemberState
from poptune.execution.session import ConfigMismatch, RunFailed, RunInterrupted, RunOptions
from poptune.experiment import Experiment
from poptune.replay import Replay
from poptune.result import Event, HistoryRecord, MemberRecord, Result, ScheduleStep
from poptune.space import Choice, Float, Int, Parameter, Space
from poptune.strategies import (
    Candidate,
    Exploit,
    Explore,
    FunctionExplore,
    Perturb,
    Resample,
    Tournament,
    Truncation,
    TTest,
)
from poptune.trainable import FunctionTrainable, MemberContext, Trainable, trainable

if TYPE_CHECKING:
    from poptune.storage.base import Storage

__version__ = "0.1.0"


def load(storage: "str | Storage", name: str) -> Result:
    """The `Result` of run ``name``, read back from ``storage`` (a URL or a `Storage`).

    Identical to what `Experiment.run` returned for that run.
    """
    from poptune.execution.session import load_result
    from poptune.storage import open_storage

    store = open_storage(storage)
    try:
        return load_result(store, name, storage_ref=storage)
    finally:
        if store is not storage:
            store.close()


__all__ = [
    "PBT",
    "Candidate",
    "Choice",
    "ConfigMismatch",
    "Decision",
    "Event",
    "Experiment",
    "Exploit",
    "Explore",
    "Float",
    "FunctionExplore",
    "FunctionTrainable",
    "HistoryRecord",
    "Int",
    "MemberContext",
    "MemberRecord",
    "MemberState",
    "Parameter",
    "Perturb",
    "Replay",
    "Resample",
    "Result",
    "RunFailed",
    "RunInterrupted",
    "RunOptions",
    "ScheduleStep",
    "Space",
    "TTest",
    "Tournament",
    "Trainable",
    "Truncation",
    "__version__",
    "load",
    "trainable",
]
