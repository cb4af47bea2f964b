"""Which device each worker trains on (``devices=`` of `Experiment.run`, ``--devices``)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

__all__ = ["assign_devices", "check_devices", "visible_gpus"]

_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def check_devices(devices: object) -> list[str] | None:
    """The devices as a list of strings (None stays None).

    Raises:
        ValueError: Not a non-empty list of device strings such as ``"cuda:0"`` or ``"cpu"``.
    """
    if devices is None:
        return None
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not isinstance(devices, Sequence) or not devices:
        raise ValueError(
            f"`devices` must be a non-empty list of devices such as ['cuda:0', 'cuda:1'] or "
            f"['cpu'], but got {devices!r}."
        )
    bad = [d for d in devices if not isinstance(d, str) or not _DEVICE.match(d)]
    if bad:
        raise ValueError(
            f"`devices` must name devices as 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu:N', but got "
            f"{bad!r}."
        )
    return [str(d) for d in devices]


def assign_devices(workers: int, devices: Sequence[str] | None) -> list[str | None]:
    """Each worker's device: round robin over ``devices`` (several workers may share one
    GPU when they outnumber the devices); None for every worker when no device is given."""
    if not devices:
        return [None] * workers
    return [devices[i % len(devices)] for i in range(workers)]


def visible_gpus() -> list[str]:
    """``cuda:0 .. cuda:N-1`` for the GPUs torch sees; none when torch is not imported (a run
    whose members use torch has imported it) or sees no GPU."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return []
    return [f"cuda:{i}" for i in range(count)]
