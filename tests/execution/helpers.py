"""Helpers shared by the executor tests."""

from __future__ import annotations

from pathlib import Path

import poptune as pt
from poptune.execution.source import load_experiment
from poptune.storage import open_storage
from poptune.storage.folders import MARKER

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


def check_exact(result: pt.Result, synchronous: bool) -> int:
    """Checks, for a deterministic member (x += a each step, score x), that every recorded
    score is exactly what the lineage says: after an exploit, the donor's value at donor_step
    plus the new a; otherwise the member's own previous value plus the a in force. Also that
    no member trains a step twice and that each record names the stretch of life (segment) it
    belongs to. Returns how many records followed a copy (so callers can require some).

    A member trains a step again only after a ``rollback`` (its checkpoint was damaged), in
    the new stretch of life that event began: never twice in one stretch."""
    events = list(result.events)
    # (member, step) -> [(segment or -1, score)], in commit order
    scores: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for h in result.history:
        seg = -1 if h.segment is None else h.segment
        found = scores.setdefault((h.member, h.step), [])
        assert all(s != seg for s, _ in found), f"member {h.member} trained step {h.step} twice"
        if found:  # trained again: only after a rollback of this member
            assert events[seg].kind == "rollback" and events[seg].member == h.member, (h, found)
        found.append((seg, h.score))

    def value(member: int, step: int, before: int) -> float:
        """The member's x at ``step`` after its events numbered below ``before``: the donor's
        when the member reached ``step`` by a copy (at that step, or of a donor ahead of it:
        its step became the donor's), else its own recorded score."""
        copies = [
            e
            for e in events
            if e.member == member
            and e.index < before
            and e.donor_step == step
            and e.donor not in (None, member)
        ]
        if copies:
            e = copies[-1]
            assert e.donor is not None and e.donor_step is not None
            return value(e.donor, e.donor_step, _before(e))
        return saved(member, step, before)

    def saved(member: int, step: int, before: int) -> float:
        """The member's x as it trained it to ``step`` (what its checkpoint there holds), in its
        latest stretch of life begun before event ``before``."""
        return [score for seg, score in scores[(member, step)] if seg < before][-1]

    def _before(e: pt.Event) -> int:
        """Which of the donor's events had taken effect when ``e`` copied it: all earlier
        ones, except that a synchronous generation's decisions all see the barrier's states."""
        return _barrier(e) if synchronous and e.kind in ("exploit", "explore") else e.index

    def _barrier(e: pt.Event) -> int:
        """Synchronous donors are taken before any decision of the generation."""
        return min(x.index for x in events if x.step == e.step and x.kind in ("exploit", "explore"))

    followed = 0
    by_member: dict[int, list[pt.HistoryRecord]] = {}
    for h in result.history:
        by_member.setdefault(h.member, []).append(h)
    for member, records in by_member.items():  # in commit order: stretch after stretch
        prev: pt.HistoryRecord | None = None
        for h in records:
            if h.segment is None:
                a = result.initial_hparams[member]["lr"]
                expected = (prev.score if prev is not None else 0.0) + a
                assert prev is None or prev.segment is None
            else:
                e = events[h.segment]
                assert e.member == member and e.step < h.step
                a = e.new_hparams["lr"]
                if prev is not None and prev.segment == h.segment:
                    expected = prev.score + a
                elif e.kind == "rollback":  # the donor's file: its x as saved at donor_step
                    assert e.donor_step is not None and h.step == e.donor_step + 1
                    base = 0.0 if e.donor is None else saved(e.donor, e.donor_step, e.index)
                    expected = base + a
                elif e.donor in (None, member):  # explore, or a fresh replacement
                    base = 0.0 if e.donor is None else value(member, e.step, e.index)
                    expected = base + a
                else:
                    assert e.donor_step is not None and h.step == e.donor_step + 1
                    base = value(e.donor, e.donor_step, _before(e))
                    expected = base + a
                    followed += 1
            assert h.score == expected, (member, h.step, h.segment, h.score, expected)
            prev = h
    return followed


def unreferenced(url: str, root: Path, name: str = "r") -> list[str]:
    """Every file of run ``name``'s checkpoint folder (under ``root``) but its marker that no
    checkpoint row and no member row names."""
    with open_storage(url) as store:
        named = {c.location for c in store.checkpoints(name)}
        named |= {m.checkpoint for m in store.members(name) if m.checkpoint is not None}
    files = [p.relative_to(root).as_posix() for p in (root / name).rglob("*") if p.is_file()]
    return sorted(f for f in files if f not in named and f != f"{name}/{MARKER}")
