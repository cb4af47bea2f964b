"""Loggers: a run's metrics and lineage, written where users already look.

``experiment.run(storage, name, loggers=[TensorBoardLogger("tb")])`` (``poptune run FILE.py
--tensorboard tb``) feeds each logger every result and lineage event the run commits, read
back from the run's storage by a `LogFeed` thread of the calling process: the same for every
executor, and never inside a worker or a training step. `Logger` is the base to write your
own; `TensorBoardLogger` (extra ``[tensorboard]``) writes TensorBoard scalars.
"""

from poptune.loggers.base import LoggedRun, LoggedStep, Logger
from poptune.loggers.feed import LogFeed
from poptune.loggers.tensorboard import TensorBoardLogger

__all__ = ["LogFeed", "LoggedRun", "LoggedStep", "Logger", "TensorBoardLogger"]
