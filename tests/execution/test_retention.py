"""Retention at each commit looks only at what the commit may have made collectable."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from poptune.execution.session import retention
from poptune.storage import MemberRow, Storage, open_storage

RUN = "r"
MEMBERS = 5


def _state(mid: int) -> dict[str, object]:
    return {"id": mid, "step": 0, "status": "running"}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("seed", range(4))
def test_commit_retention_leaves_nothing_a_full_pass_would_collect(
    kind: str, seed: int, tmp_path: Path
) -> None:
    """Random commits: members save checkpoints, copy the checkpoint another member stands on
    (an exploit) and move past it. After each commit's narrowed retention, a pass over every
    checkpoint of the run finds nothing more to collect, and no checkpoint a member stands on
    was collected."""
    rng = random.Random(seed)
    storage: Storage = open_storage(
        "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/r.db"
    )
    keep = rng.choice([1, 2, 3])
    storage.create_run(RUN, {}, "fp", members=[MemberRow(_state(i)) for i in range(MEMBERS)])
    collected: set[str] = set()
    for i in range(120):
        with storage.transaction(RUN) as tx:
            stored = {r.id: r for r in tx.members()}
            rows = dict(stored)
            saved = set(rng.sample(range(MEMBERS), k=rng.randint(0, 2)))
            for m in saved:
                location = f"c{i}-{m}"
                tx.add_checkpoint(m, i, location, 1)
                rows[m] = replace(rows[m], checkpoint=location, checkpoint_step=i)
            for m in rng.sample(range(MEMBERS), k=rng.randint(0, 2)):
                donor = rng.randrange(MEMBERS)
                if m not in saved and rows[donor].checkpoint is not None:
                    rows[m] = replace(rows[m], checkpoint=rows[donor].checkpoint)
            changed = [r for r in rows.values() if stored[r.id] != r]
            tx.put_members(changed)
            doomed = retention(tx, keep, list(rows.values()), stored, saved)
            standing = {r.checkpoint for r in rows.values()}
            assert not standing & set(doomed)
            collected |= set(doomed)
            assert retention(tx, keep, list(rows.values())) == [], f"commit {i}"
    assert collected  # the sequence did exercise collection
    storage.close()
