"""Axes and colours the renderers share: scales with readable ticks, member and score colours.

Pure Python: the SVG renderer draws with these, and the PNG renderer uses the same colours so
that a member, a score or the best ancestry looks the same in both.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Scale", "format_tick", "member_colour", "score_colour"]

# Distinguishable on white for small populations (8 members get 8 clearly different colours).
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
# Viridis at 9 stops: perceptually even, readable in grey, colour-blind safe.
_VIRIDIS = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)


def member_colour(member: int, population: int) -> str:
    """A member's colour: a fixed palette up to 10 members, evenly spread hues beyond."""
    if population <= len(_PALETTE):
        return _PALETTE[member % len(_PALETTE)]
    # Golden-ratio hue steps keep neighbouring ids apart; two lightness levels add contrast.
    hue = (member * 0.618033988749895) % 1.0
    light = 0.42 if member % 2 else 0.55
    r, g, b = colorsys.hls_to_rgb(hue, light, 0.75)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def score_colour(fraction: float) -> str:
    """Viridis at ``fraction`` in [0, 1] (1 = best); grey for NaN."""
    if not math.isfinite(fraction):
        return "#bbbbbb"
    x = min(1.0, max(0.0, fraction)) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    t = x - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * t) for k in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def format_tick(value: float) -> str:
    """A tick label: ``0.001``, ``1e-05``, ``250``, ``1.2``."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.6g}"


def _nice_step(span: float, count: int) -> float:
    raw = span / max(1, count)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * magnitude >= raw:
            return m * magnitude
    return 10 * magnitude


@dataclass(frozen=True)
class Scale:
    """Maps data values in ``[low, high]`` to pixels in ``[start, stop]`` (linear or log)."""

    low: float
    high: float
    start: float
    stop: float
    log: bool = False

    @classmethod
    def fit(
        cls,
        values: Sequence[float],
        start: float,
        stop: float,
        *,
        log: bool = False,
        pad: float = 0.04,
        bounds: tuple[float | None, float | None] = (None, None),
    ) -> Scale:
        """A scale covering ``values`` (finite ones; positive ones on a log scale), padded."""
        finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
        finite += [b for b in bounds if b is not None and math.isfinite(b) and (b > 0 or not log)]
        if not finite:
            return (
                cls(0.0, 1.0, start, stop, False) if not log else cls(0.1, 10.0, start, stop, True)
            )
        lo, hi = min(finite), max(finite)
        if log:
            llo, lhi = math.log10(lo), math.log10(hi)
            if lhi - llo < 1e-12:
                llo, lhi = llo - 0.5, lhi + 0.5
            margin = (lhi - llo) * pad
            return cls(10 ** (llo - margin), 10 ** (lhi + margin), start, stop, True)
        if hi - lo < 1e-12 * max(1.0, abs(hi)):
            half = max(abs(hi) * 0.05, 0.5)
            lo, hi = lo - half, hi + half
        margin = (hi - lo) * pad
        return cls(lo - margin, hi + margin, start, stop, False)

    def __call__(self, value: float) -> float:
        if self.log:
            v = max(value, 1e-300)
            f = (math.log10(v) - math.log10(self.low)) / (
                math.log10(self.high) - math.log10(self.low)
            )
        else:
            f = (value - self.low) / (self.high - self.low)
        return self.start + f * (self.stop - self.start)

    def ticks(self, count: int = 5) -> list[float]:
        """Round values inside the range: 1-2-5 steps, or powers of ten on a log scale."""
        if self.log:
            lo, hi = math.log10(self.low), math.log10(self.high)
            decades = list(range(math.ceil(lo), math.floor(hi) + 1))
            if len(decades) >= 2:
                every = max(1, math.ceil(len(decades) / count))
                return [10.0**d for d in decades[::every]]
            out = []
            for d in range(math.floor(lo), math.ceil(hi) + 1):
                out += [m * 10.0**d for m in (1, 2, 5)]
            out = [v for v in out if self.low <= v <= self.high]
            if len(out) >= 2:
                return out
            # Less than a factor of 2.5 wide: round values, evenly spaced, still labelled.
            linear = Scale(self.low, self.high, self.start, self.stop).ticks(count)
            return [v for v in linear if v > 0]
        step = _nice_step(self.high - self.low, count)
        first = math.ceil(self.low / step) * step
        out = []
        v = first
        while v <= self.high + step * 1e-9:
            out.append(round(v, 12))
            v += step
        return out
