"""`TensorBoardLogger`: each member's metrics and hyperparameters as TensorBoard scalars.

Layout, under ``LOGDIR/RUN/``: one TensorBoard run per member (``member_03``), with a scalar
per metric (``Q``, ``loss``...) and one per numeric hyperparameter (``hparams/lr``); and one
run ``best``, written when the run ends, that follows the final best member's ancestry: at
each step, the metrics of the ancestor that trained it and the hyperparameters in force (its
schedule, `poptune.Result.schedule`), plus ``ancestor``, the id of that ancestor.

**No sawtooth after an exploit.** A member that copies a donor takes the donor's weights *and
its step count* (a member never copies a donor behind it), so its steps never go back; what
changes at an exploit is where its curve continues from. Before the member's first step after
the exploit, the logger writes into the member's own series the donor's recorded values from
the member's step to the donor's (the stretch of the donor's curve its state now comes from)
and the new hyperparameters at the donor's step. The member's curve thus drops (or rises)
vertically at the step of the exploit onto the donor's curve and continues from there: it
never draws a slope that no training produced, and never a curve that pretends the member
kept its own weights (Ray Tune's cloned trials keep their own log and jump back,
ray#5312). Hyperparameters are drawn as the step functions they are: a vertical change at
the step where an exploit or explore set them. A string hyperparameter has no scalar; a bool
is 0 or 1.

The files are written here (`EventEncoder`, `EventFile`: the event format is small and
stable), byte for byte as tensorboardX writes them (tested) and read back in the tests by
TensorBoard's own reader. Measured on a 2-core machine: building the events as protobuf
objects, tensorboardX's pure-Python checksum and its fsync at every flush cost a serial run
several times what the logger costs now (``benchmarks/loggers.py``). Needs ``crc32c``, a
native checksum (``pip install 'poptune[tensorboard]'``); view the files with
``tensorboard --logdir LOGDIR`` (the ``tensorboard`` package).

Example:
    >>> result = experiment.run(loggers=[TensorBoardLogger("tb")])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from poptune.loggers.base import LoggedRun, LoggedStep, Logger

if TYPE_CHECKING:
    from poptune.result import Event, Result

__all__ = ["EventEncoder", "TensorBoardLogger"]

_INSTALL = "pip install 'poptune[tensorboard]'"


def _checksum() -> Callable[[bytes], int]:
    try:
        from crc32c import crc32c
    except ImportError as e:
        raise ImportError(
            f"TensorBoardLogger needs crc32c (event files are checksummed): {_INSTALL} "
            "(or pip install crc32c)."
        ) from e
    checksum: Callable[[bytes], int] = crc32c
    return checksum


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None  # a string (or other) hyperparameter has no scalar


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTES[n]
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


_BYTES = [bytes((i,)) for i in range(0x80)]
_FLOAT = struct.Struct("<f")
_DOUBLE = struct.Struct("<d")
_LENGTH = struct.Struct("<Q")
_UINT = struct.Struct("<I")


class EventEncoder:
    """TensorBoard ``Event`` messages of scalars, as protocol buffer bytes.

    Byte for byte what tensorboardX's ``Event(wall_time, step, summary=Summary(value=[
    Value(tag, simple_value)...]))`` serialises to (a test checks it), about 5x faster than
    building those objects, which were most of the logger's cost per member-step. Fields:
    ``Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5}``,
    ``Summary{value=1}``, ``Summary.Value{tag=1, simple_value=2 (float)}``.
    """

    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}

    def _value(self, tag: str) -> bytes:
        """A ``Summary.value`` entry up to its float: key, length, tag, simple_value's key."""
        head = self._values.get(tag)
        if head is None:
            raw = tag.encode()
            inner = b"\x0a" + _varint(len(raw)) + raw + b"\x15"
            head = self._values[tag] = b"\x0a" + _varint(len(inner) + 4) + inner
        return head

    def scalars(self, wall: float, step: int, values: Sequence[tuple[str, float]]) -> bytes:
        """An event at ``step`` with one scalar per ``(tag, value)``."""
        summary = b"".join([self._value(tag) + _FLOAT.pack(value) for tag, value in values])
        at = b"\x10" + _varint(step) if step else b""  # proto3 leaves a 0 out
        return b"\x09" + _DOUBLE.pack(wall) + at + b"\x2a" + _varint(len(summary)) + summary

    @staticmethod
    def file_version(wall: float) -> bytes:
        """The event that opens every event file."""
        version = b"brain.Event:2"
        return b"\x09" + _DOUBLE.pack(wall) + b"\x1a" + _varint(len(version)) + version


class EventFile:
    """One TensorBoard event file: records of ``length, crc(length), data, crc(data)`` (the
    TFRecord framing, masked CRC-32C), written through a buffer; `flush` makes them visible
    to a reader (no fsync: a lost tail of a log is not worth a disk sync per read)."""

    def __init__(self, path: str, crc32c: Callable[[bytes], int]) -> None:
        self._crc32c = crc32c
        self._file = open(path, "ab")  # noqa: SIM115 (kept open until close())

    def _masked(self, data: bytes) -> bytes:
        x = self._crc32c(data)
        return _UINT.pack((((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(self, data: bytes) -> None:
        header = _LENGTH.pack(len(data))
        self._file.write(header + self._masked(header) + data + self._masked(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(Logger):
    """Writes each member's curves, and the best member's ancestry, as TensorBoard scalars.

    Args:
        logdir: The folder (``tensorboard --logdir`` it); the run's go in ``logdir/RUN``.

    Raises:
        ImportError: tensorboardX is not installed (the message says what to install).
    """

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self._crc32c = _checksum()
        self._encode = EventEncoder()
        self.logdir = os.fspath(logdir)
        self.root = self.logdir
        self._writers: dict[str, Any] = {}
        self._width = 2
        self._tag = uuid.uuid4().hex[:8]  # two writers of one folder never share a file

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.logdir!r})"

    # -- hooks ---------------------------------------------------------------------------------

    def start(self, run: LoggedRun) -> None:
        self.root = os.path.join(self.logdir, run.name)
        self._width = max(2, len(str(max(0, run.population_size - 1))))

    def on_result(self, step: LoggedStep) -> None:
        self._write(self.member_run(step.member), step.step, step.metrics, step.hparams)

    def on_event(self, event: Event, bridge: Sequence[LoggedStep]) -> None:
        run = self.member_run(event.member)
        for s in bridge:  # the donor's curve, from the member's step to the donor's
            self._write(run, s.step, s.metrics, s.hparams)
        at = event.donor_step if event.donor_step is not None else event.step
        if event.donor is None:
            return  # a fresh replacement: its curve starts with its first step
        self._write(run, at, {}, event.new_hparams)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self, result: Result | None) -> None:
        try:
            if result is not None and result.members and result.history:
                self._best(result)
        finally:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()

    # -- writing -------------------------------------------------------------------------------

    def member_run(self, member: int) -> str:
        """The TensorBoard run (folder name under ``logdir/RUN``) of a member."""
        return f"member_{member:0{self._width}d}"

    def _best(self, result: Result) -> None:
        by_step = {(h.member, h.step): h for h in result.history}
        for s in result.schedule():
            record = by_step.get((s.member, s.step))
            metrics = dict(record.metrics) if record is not None else {}
            metrics["ancestor"] = float(s.member)
            self._write("best", s.step, metrics, s.hparams)

    def _write(
        self, run: str, step: int, metrics: Mapping[str, float], hparams: Mapping[str, Any]
    ) -> None:
        values = [(tag, float(value)) for tag, value in metrics.items()]
        for name, value in hparams.items():
            number = _scalar(value)
            if number is not None and math.isfinite(number):
                values.append((f"hparams/{name}", number))
        self._writer(run).write(self._encode.scalars(time.time(), max(0, int(step)), values))

    def _writer(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is None:
            folder = os.path.join(self.root, run)
            os.makedirs(folder, exist_ok=True)
            now = time.time()
            # TensorBoard reads every file whose name holds "tfevents" (in name order).
            name = (
                f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{self._tag}"
            )
            writer = self._writers[run] = EventFile(os.path.join(folder, name), self._crc32c)
            writer.write(EventEncoder.file_version(now))
        return writer
