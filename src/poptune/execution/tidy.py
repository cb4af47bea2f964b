"""Removes the checkpoint files of a run that no worker will ever commit.

A worker saves a member's checkpoint (through a ``.tmp-`` file renamed into place) before the
transaction that records it, so a worker killed in between leaves a file that no row refers
to, for good. Such files are removed here, but only once no worker of the run may still be
working: removing a live worker's temporary file makes its save fail (a retry), and removing
a file it saved would leave its commit naming a checkpoint that is gone.

`tidy_checkpoints` runs when an execution starts (before its workers) and once the run is
completed (by the worker that completed it, and by the driver of `poptune.execution.execute`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from poptune.execution.lifecycle import committing
from poptune.execution.session import release_held
from poptune.storage.leases import owner_alive

if TYPE_CHECKING:
    from poptune.storage.base import Storage
    from poptune.storage.checkpoints import CheckpointStore

__all__ = ["tidy_checkpoints"]


def tidy_checkpoints(
    storage: Storage, run: str, checkpoints: CheckpointStore, timeout: float | None = None
) -> int | None:
    """Removes ``run``'s temporary files and the checkpoint files that neither a checkpoint
    row nor a member row refers to, if no worker of the run may still be working.

    No member may be held by an owner that `poptune.storage.leases.owner_alive` says may still
    be working, judged by ``timeout``. It all happens inside the run's exclusive transaction,
    so no worker claims a member (and starts saving) meanwhile; members still held by owners
    presumed dead are released in it, so that such an owner, if it was only frozen, has its
    late commit refused instead of recording a file removed here.

    Args:
        storage: The run's storage.
        run: The run's name.
        checkpoints: The run's checkpoint store.
        timeout: The heartbeat timeout to judge owners by (default: the run's recorded one,
            else 30 s).

    Returns:
        How many files were removed; None when a worker may still be working (nothing is
        removed then).
    """
    with committing(storage, run) as tx:
        rows = tx.members()
        if timeout is None:
            timeout = float(tx.run().execution.get("heartbeat_timeout") or 30.0)
        now = tx.now()
        if any(owner_alive(r.owner, r.heartbeat, timeout, now) for r in rows):
            return None
        if any(r.owner is not None for r in rows):
            release_held(tx, lambda owner: True)  # every owner left is presumed dead
        referenced = {c.location for c in tx.checkpoints()}
        referenced |= {r.checkpoint for r in rows if r.checkpoint is not None}
        # Files go while the run is locked; a storage error after this only keeps the
        # dead owners' claims, which any worker may take anyway.
        return checkpoints.cleanup_temporary(run) + checkpoints.collect_unreferenced(
            run, referenced
        )
