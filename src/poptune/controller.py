"""The PBT decision logic as a pure ask/tell object.

`PBT` holds what the algorithm needs to know about each member (its hyperparameters, step, last
ready point, latest scores, status) and nothing else: no weights, no I/O, no clock. A training
loop tells it scores; at a member's ready point it answers with a `Decision`: carry on, or copy
member X's state with these new hyperparameters. The runners of poptune are built on it, and a
user with their own training loop can drive it directly:

    >>> import poptune as pt
    >>> pbt = pt.PBT({"lr": pt.Float(1e-3, 1e-1, log=True)}, population_size=2, interval=2,
    ...              exploit=pt.Truncation(0.5), seed=0)
    >>> pbt.report(0, 1, 0.1); pbt.report(1, 1, 0.2)
    >>> d0 = pbt.tell(0, 2, 0.3)           # member 0 is ready at step 2; member 1 is at 0.2
    >>> d0.action
    'continue'
    >>> d1 = pbt.tell(1, 2, 0.1)           # member 1 is worse: it copies member 0
    >>> (d1.action, d1.donor, d1.donor_step)
    ('exploit', 0, 2)

Semantics, each one a trap that bit another library:

* A member is *ready* when ``step >= burn_in`` and ``step - last_ready >= interval``, and it has
  not reached ``steps``. Only then is it judged.
* Asynchronous mode: a member judged at step ``s`` is compared with every other alive member's
  score *at step s* where that member has one (the score of its latest ready point at or
  before ``s``; members ahead of ``s`` keep a record of their recent ready points for this), so
  members are never ranked against more trained or less trained versions of each other when an
  equal-step score exists. A donor is never *behind* the member (its latest checkpoint is at a
  step before ``s``), nor one whose latest state scored NaN or infinite (it may have diverged
  after ``s``): such a choice is a ``"continue"``. Copying back would make the member
  re-train steps it has trained, and on a score that saturates it livelocks (trap 13).
* Synchronous mode (``synchronous=True``): members are judged together once every alive member
  has reached the generation's ready point. Finished and failed members are never waited for,
  and a replacement joins the generation clock of the member it copied. Every decision a closing
  generation makes is kept until `collect` (or `poll`) hands it out: none is lost.
* The donor's state to copy is the one that produced the donor's latest known score:
  ``Decision.donor_step`` names its step (never before the member's). After an exploit the
  member's step *is* the donor's step, its next ready point is counted from there, and its
  latest score, score window and ready-point record are the donor's (a score measures the
  weights, which are now the donor's).
* Explore always starts from the donor's hyperparameters, and what it returns must be in the
  space: a strategy that returns a value out of range or not finite, or that raises, makes
  `decide` (or `replace`) raise `poptune.strategies.ExploreError`, a configuration error.
* NaN, infinite and missing scores rank worst; exact ties are broken at random; fewer than two
  scored members means no exploit.
* Randomness: every decision draws from its own ``numpy.random.Generator`` derived from
  ``seed``, the member and how many decisions that member has had (or, in synchronous mode, the
  generation). So the same seed gives the same decisions, and a controller rebuilt from a
  snapshot (`PBT.snapshot` / `PBT.restore`) continues exactly where it was, whichever process
  makes the next decision. Pass ``rng=`` to `decide` to use a generator of your own instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from poptune.space import Parameter, Space
from poptune.strategies.exploit import Candidate, Exploit, Truncation, TTest
from poptune.strategies.explore import Explore, Perturb, as_explore, explore_checked

__all__ = ["PBT", "Decision", "MemberState"]

Action = Literal["continue", "wait", "exploit", "explore"]
Status = Literal["running", "waiting", "finished", "failed"]

_RNG_INIT, _RNG_DECIDE, _RNG_GENERATION, _RNG_REPLACE = 1, 2, 3, 4
#: Ready points a member remembers (step, score), for equal-step comparisons with members that
#: reach a step later than it did. Workers keep members within a few intervals of each other.
READY_RECORD = 8


def derive_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys``: the same inputs, the same stream."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]))


def ready_step(step: int, last_ready: int, interval: int, burn_in: int, steps: int | None) -> int:
    """The readiness rule: the step at which a member at ``step``, last judged at
    ``last_ready``, is judged next (its next ready point, or ``steps``; ``step`` itself when
    it is ready now). Every executor trains members by it."""
    ready = max(last_ready + interval, burn_in, step)
    return ready if steps is None else min(ready, max(steps, step))


def member_seed(seed: int, member: int) -> int:
    """The seed handed to a member's trainable: distinct per member, fixed by the run's seed."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0, member]).generate_state(1)[0])


@dataclass
class MemberState:
    """What the controller knows of one member. Plain data: easy to store and restore.

    Attributes:
        id: The member's id (0 .. population_size - 1 for the initial population).
        hparams: The hyperparameters it trains with now.
        step: Its step count (the donor's after an exploit).
        last_ready: The step of its last ready point (0 at the start).
        score: Its latest known score as reported (not oriented), or None.
        score_step: The step at which ``score`` was reported.
        window: Its most recent reported scores, oldest first (for the t-test).
        status: running, waiting (at a synchronous barrier), finished or failed.
        decisions: How many decisions it has had; keys its random stream.
        replaces: The failed member it replaced, if any.
        ready: Its recent ready points as ``[step, score]`` pairs, oldest first (its donor's
            before an exploit): what it scored at each, for equal-step comparisons.
        segment: The index of the lineage event that began the stretch of its life it is in
            now (None: its initial stretch). Set by executors, which number events; the
            controller only carries it.
    """

    id: int
    hparams: dict[str, Any]
    step: int = 0
    last_ready: int = 0
    score: float | None = None
    score_step: int | None = None
    window: list[float] = field(default_factory=list)
    status: Status = "running"
    decisions: int = 0
    replaces: int | None = None
    ready: list[list[float]] = field(default_factory=list)
    segment: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hparams": dict(self.hparams),
            "step": self.step,
            "last_ready": self.last_ready,
            "score": self.score,
            "score_step": self.score_step,
            "window": list(self.window),
            "status": self.status,
            "decisions": self.decisions,
            "replaces": self.replaces,
            "ready": [list(r) for r in self.ready],
            "segment": self.segment,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemberState:
        return cls(
            id=int(data["id"]),
            hparams=dict(data["hparams"]),
            step=int(data["step"]),
            last_ready=int(data["last_ready"]),
            score=None if data["score"] is None else float(data["score"]),
            score_step=None if data["score_step"] is None else int(data["score_step"]),
            window=[float(s) for s in data["window"]],
            status=data["status"],
            decisions=int(data["decisions"]),
            replaces=None if data.get("replaces") is None else int(data["replaces"]),
            ready=[[int(r[0]), float(r[1])] for r in data.get("ready") or ()],
            segment=None if data.get("segment") is None else int(data["segment"]),
        )


@dataclass(frozen=True)
class Decision:
    """What a ready member must do next.

    Attributes:
        action: ``"continue"`` (train on as it is), ``"wait"`` (synchronous mode: the generation
            is not complete; ask again with `PBT.poll`), ``"exploit"`` (load the donor's state
            at ``donor_step``, then apply ``hparams``) or ``"explore"`` (keep its own state,
            apply ``hparams``).
        member: The member this decision is for.
        step: The member's step when it was judged.
        donor: The member whose state and hyperparameters it takes (itself for ``"explore"``).
        donor_step: The step of the donor's state to load.
        hparams: The hyperparameters to train with from now on.
        old_hparams: The hyperparameters it had before.
        operations: What explore did to each hyperparameter it touched.
    """

    action: Action
    member: int
    step: int
    donor: int | None = None
    donor_step: int | None = None
    hparams: Mapping[str, Any] | None = None
    old_hparams: Mapping[str, Any] | None = None
    operations: Mapping[str, str] = field(default_factory=dict)

    @property
    def copies_state(self) -> bool:
        """True when the member must load another member's state."""
        return self.action == "exploit" and self.donor != self.member


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name} >= {low}` must hold for an integer, but got {name}={value!r}.")
    return int(value)


class PBT:
    """Population Based Training as an ask/tell object (see the module docstring).

    Args:
        space: Hyperparameter declarations (a dict of `Float`, `Int`, `Choice`, or a `Space`).
        population_size: Number of members, at least 2.
        interval: Steps between a member's ready points, at least 1.
        burn_in: No member is ready before this step.
        steps: Total steps per member; a member at ``steps`` is finished. None: no limit.
        mode: ``"max"`` if a higher score is better, ``"min"`` otherwise.
        exploit: An exploit strategy, or None for none (explore-only when ``explore`` is set).
        explore: An explore strategy, a callable ``(hparams, rng) -> dict``, or None.
        synchronous: Judge whole generations at a barrier instead of each member on arrival.
        seed: Seeds every random choice.
        initial_hparams: Optional explicit hyperparameters, one dict per member.
        snapshot: State taken by `snapshot` to continue from, instead of a new population.
    """

    def __init__(
        self,
        space: Mapping[str, Parameter] | Space,
        population_size: int,
        interval: int,
        *,
        burn_in: int = 0,
        steps: int | None = None,
        mode: str = "max",
        exploit: Exploit | None = Truncation(0.2),  # noqa: B008 (frozen, immutable)
        explore: object = Perturb(),
        synchronous: bool = False,
        seed: int = 0,
        initial_hparams: Sequence[Mapping[str, Any]] | None = None,
        snapshot: Mapping[str, Any] | None = None,
    ) -> None:
        self.space = space if isinstance(space, Space) else Space(space)
        self.population_size = _check_int("population_size", population_size, 2)
        self.interval = _check_int("interval", interval, 1)
        self.burn_in = _check_int("burn_in", burn_in, 0)
        self.steps = None if steps is None else _check_int("steps", steps, 1)
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', but got {mode!r}.")
        self.mode = mode
        if exploit is not None and not isinstance(exploit, Exploit):
            raise ValueError(
                f"`exploit` must be pt.Truncation, pt.TTest, pt.Tournament, another pt.Exploit "
                f"or None, but got {exploit!r}."
            )
        self.exploit = exploit
        self.explore: Explore | None = as_explore(explore)
        self.synchronous = bool(synchronous)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an integer, but got {seed!r}.")
        self.seed = int(seed)
        self.window_size = max(self.exploit.window if isinstance(self.exploit, TTest) else 1, 1)
        self.generation = 0
        self._pending: dict[int, Decision] = {}
        self._candidate_memo: dict[int, tuple[float | None, list[float], Candidate]] = {}
        self.members: dict[int, MemberState] = {}
        if snapshot is not None:
            # Continuing a stored population: drawing a fresh one first would be wasted work
            # (it is half a millisecond at 32 members, paid at every ready point by workers).
            self.restore(snapshot)
            return
        for i, hp in enumerate(self._initial(initial_hparams)):
            self.members[i] = MemberState(id=i, hparams=hp)

    # -- set-up ------------------------------------------------------------------------------

    def _initial(self, given: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        if given is None:
            return [
                self.space.sample(derive_rng(self.seed, _RNG_INIT, i))
                for i in range(self.population_size)
            ]
        if isinstance(given, Mapping) or not isinstance(given, Sequence):
            raise ValueError(
                f"`initial_hparams` must be a list of dicts, one per member, but got {given!r}."
            )
        if len(given) != self.population_size:
            raise ValueError(
                f"`initial_hparams` must hold one dict per member ({self.population_size}), "
                f"but got {len(given)}."
            )
        return [
            self.space.validate(hp, where=f"initial_hparams[{i}]") for i, hp in enumerate(given)
        ]

    # -- what a training loop tells ----------------------------------------------------------

    def _member(self, member: int) -> MemberState:
        try:
            return self.members[member]
        except KeyError:
            raise KeyError(f"No member {member!r} in this population.") from None

    def report(self, member: int, step: int, score: float | None) -> None:
        """Records ``member``'s score at ``step`` without judging it."""
        m = self._member(member)
        m.step = int(step)
        m.score = None if score is None else float(score)
        m.score_step = m.step
        m.window.append(math.nan if score is None else float(score))
        if len(m.window) > self.window_size:
            del m.window[: len(m.window) - self.window_size]

    def is_ready(self, member: int) -> bool:
        """True when ``member`` has reached a ready point (and is not finished)."""
        m = self._member(member)
        if m.status != "running":
            return False
        if self.steps is not None and m.step >= self.steps:
            return False
        return m.step >= self.burn_in and m.step - m.last_ready >= self.interval

    def next_ready(self, member: int) -> int:
        """The step at which ``member`` is next judged: its next ready point, or ``steps``.

        The one readiness rule every executor trains by: a member trains from its step up to
        this step, then is judged. Equal to its step when it is ready now.
        """
        m = self._member(member)
        return ready_step(m.step, m.last_ready, self.interval, self.burn_in, self.steps)

    def tell(self, member: int, step: int, score: float | None) -> Decision:
        """Records a score, then judges the member if it is ready (see `decide`)."""
        self.report(member, step, score)
        return self.decide(member)

    def decide(self, member: int, rng: np.random.Generator | None = None) -> Decision:
        """Judges ``member`` at its current step.

        A member that has reached ``steps`` is marked finished. A member that is not ready gets
        ``"continue"`` and nothing changes. In synchronous mode a ready member gets ``"wait"``
        until the whole generation is in; the member whose arrival completes it gets its own
        decision, and every member's decision can then be read with `poll`.
        """
        m = self._member(member)
        if m.status == "waiting":
            return self.poll(member)
        if self.steps is not None and m.step >= self.steps:
            self.finish(member)
            return Decision("continue", member, m.step)
        if not self.is_ready(member):
            return Decision("continue", member, m.step)
        self._record_ready(m)
        if not self.synchronous:
            rng = rng if rng is not None else derive_rng(self.seed, _RNG_DECIDE, m.id, m.decisions)
            return self._judge(m, self._candidates(m.step), rng, self._donor_state)
        m.status = "waiting"
        self._maybe_close_generation(rng)
        return self.poll(member)

    def collect(self) -> list[Decision]:
        """Hands out, by member id, every decision made but not yet delivered.

        In synchronous mode a generation is decided by whichever call completes it: a
        member's `decide`, or `fail`, `finish` or `replace` of another member. An executor
        calls this after each of those and applies all it returns, so no decision is lost or
        delivered late. Always empty in asynchronous mode.
        """
        out = [self._pending[k] for k in sorted(self._pending)]
        self._pending.clear()
        return out

    def poll(self, member: int) -> Decision:
        """Synchronous mode: the member's decision once its generation is decided, else wait."""
        m = self._member(member)
        if member in self._pending:
            return self._pending.pop(member)
        if m.status == "waiting":
            return Decision("wait", member, m.step)
        return Decision("continue", member, m.step)

    def finish(self, member: int) -> None:
        """Marks ``member`` finished: it is no longer compared with, copied, or waited for."""
        self._set_final(member, "finished")

    def fail(self, member: int) -> None:
        """Marks ``member`` failed: it is no longer compared with, copied, or waited for."""
        self._set_final(member, "failed")

    def rollback(self, member: int, step: int) -> None:
        """Puts ``member`` back at ``step`` with its hyperparameters: the state it stood on is
        lost (a damaged or missing checkpoint) and it trains on from one saved at ``step`` (0:
        from scratch). Its score is unknown until its next ready point, ``step + interval``;
        a finished member runs again. A failed member stays failed.
        """
        m = self._member(member)
        if m.status == "failed":
            return
        self._pending.pop(member, None)
        m.step = m.last_ready = int(step)
        m.score = m.score_step = None
        m.window, m.ready = [], []
        m.status = "running"

    def _set_final(self, member: int, status: Status) -> None:
        m = self._member(member)
        self._pending.pop(member, None)
        m.status = status
        if self.synchronous:
            self._maybe_close_generation(None)

    def replace(self, failed: int) -> Decision:
        """Adds a member in place of a failed one, so the population keeps its size.

        The new member copies a member drawn uniformly from the top of the ranking (the top
        ``ceil(20%)``), then explores; with no scored member to copy, it starts afresh from the
        priors. Returns its decision: ``"exploit"`` with a donor, or ``"explore"`` from
        scratch (``donor`` None, ``donor_step`` 0).

        In synchronous mode failing the member may complete a generation: call `fail` and
        `collect` first to apply those decisions before this one (the executors do).
        """
        old = self._member(failed)
        if old.status != "failed":
            self.fail(failed)
        new_id = max(self.members) + 1
        rng = derive_rng(self.seed, _RNG_REPLACE, new_id)
        ranked = sorted(
            (c for c in self._candidates() if math.isfinite(c.score)),
            key=lambda c: (-c.score, c.id),
        )
        if not ranked:
            hp = self.space.sample(rng)
            self.members[new_id] = MemberState(id=new_id, hparams=hp, replaces=failed)
            return Decision(
                "explore", new_id, 0, None, 0, hp, dict(old.hparams), {k: "resample" for k in hp}
            )
        top = ranked[: max(1, math.ceil(0.2 * len(ranked)))]
        donor = self.members[top[int(rng.integers(len(top)))].id]
        hparams: dict[str, Any] = dict(donor.hparams)
        ops: dict[str, str] = {}
        if self.explore is not None:  # first: a strategy that raises leaves no new member
            hparams, ops = explore_checked(self.explore, donor.hparams, self.space, rng)
        new = MemberState(id=new_id, hparams=dict(donor.hparams), replaces=failed)
        self.members[new_id] = new
        decision = Decision(
            "exploit",
            new_id,
            donor.step,
            donor.id,
            donor.score_step,
            hparams,
            dict(old.hparams),  # as for a fresh start: the failed member's, which it replaces
            ops,
        )
        # The replacement keeps the donor's ready clock: its next ready point is the donor's, so
        # a synchronous generation stays aligned and an asynchronous member is not judged early.
        self._adopt(new, donor.to_dict(), hparams, last_ready=min(donor.last_ready, donor.step))
        if self.synchronous and self.is_ready(new_id):
            # Copied from a member waiting at the barrier: it is at the generation's ready
            # point already, so it joins this generation rather than train past it. Its
            # generation decision (if this closes it) comes after this one, from `collect`.
            self._record_ready(new)
            new.status = "waiting"
            self._maybe_close_generation(None)
        return decision

    # -- judging -----------------------------------------------------------------------------

    def _record_ready(self, m: MemberState) -> None:
        score = math.nan if m.score is None else float(m.score)
        if m.ready and m.ready[-1][0] == m.step:
            m.ready[-1] = [m.step, score]
        else:
            m.ready.append([m.step, score])
            if len(m.ready) > READY_RECORD:
                del m.ready[: len(m.ready) - READY_RECORD]

    @staticmethod
    def _score_at(m: MemberState, step: int | None) -> float | None:
        """``m``'s score at ``step``: that of its latest ready point (or report) at or before
        ``step``; its latest score if it has none (or ``step`` is None)."""
        if step is None or m.score_step is None or m.score_step <= step:
            return m.score
        for s, score in reversed(m.ready):
            if s <= step:
                return score
        return m.score

    def _oriented(self, score: float | None) -> float:
        if score is None or not math.isfinite(score):
            return -math.inf
        return score if self.mode == "max" else -score

    def _candidate(self, m: MemberState, step: int | None = None) -> Candidate:
        # Every decision ranks the whole population; a member's candidate is rebuilt only when
        # its score or window changed, which keeps the cost per decision low as it grows.
        score = self._score_at(m, step)
        memo = self._candidate_memo.get(m.id)
        if memo is not None and memo[0] == score and memo[1] == m.window:
            return memo[2]
        c = Candidate(m.id, self._oriented(score), tuple(self._oriented(s) for s in m.window))
        self._candidate_memo[m.id] = (score, list(m.window), c)
        return c

    def _candidates(self, step: int | None = None) -> list[Candidate]:
        """Every alive scored member, each scored at ``step`` where it can be (see `_score_at`)."""
        return [
            self._candidate(m, step)
            for m in self.members.values()
            if m.status in ("running", "waiting") and m.score is not None
        ]

    def _donor_state(self, donor: int) -> dict[str, Any]:
        return self.members[donor].to_dict()

    def _judge(
        self,
        m: MemberState,
        candidates: list[Candidate],
        rng: np.random.Generator,
        donor_state: Any,
    ) -> Decision:
        """Decides for one ready member and updates its bookkeeping."""
        m.decisions += 1
        step, old = m.step, dict(m.hparams)
        donor_id: int | None = None
        if self.exploit is not None and len(candidates) >= 2:
            me = next((c for c in candidates if c.id == m.id), None)
            if me is None:  # it reported no score: it ranks worst, so it is judged too
                me = self._candidate(m)
                candidates = [*candidates, me]
            donor_id = self.exploit.select(me, candidates, rng)
        if donor_id is not None and donor_id != m.id:
            donor = donor_state(donor_id)
            donor_step = donor["score_step"] if donor["score_step"] is not None else donor["step"]
            if int(donor_step) < step or not math.isfinite(self._oriented(donor["score"])):
                # Never copy back: the member would re-train its own steps. Nor a state that
                # scored NaN or inf: ranked at `step`, the donor may have diverged since.
                donor_id = None
        if donor_id is not None and donor_id != m.id:
            hparams = dict(donor["hparams"])
            ops: dict[str, str] = {}
            if self.explore is not None:
                hparams, ops = explore_checked(self.explore, donor["hparams"], self.space, rng)
            self._adopt(m, donor, hparams)
            return Decision("exploit", m.id, step, donor_id, donor["score_step"], hparams, old, ops)
        m.last_ready = m.step
        if self.exploit is None and self.explore is not None:
            hparams, ops = explore_checked(self.explore, m.hparams, self.space, rng)
            m.hparams = hparams
            return Decision("explore", m.id, step, m.id, step, hparams, old, ops)
        return Decision("continue", m.id, step)

    def _adopt(
        self,
        m: MemberState,
        donor: Mapping[str, Any],
        hparams: dict[str, Any],
        last_ready: int | None = None,
    ) -> None:
        m.hparams = hparams
        m.step = int(donor["score_step"] if donor["score_step"] is not None else donor["step"])
        m.last_ready = m.step if last_ready is None else last_ready
        m.score = donor["score"]
        m.score_step = donor["score_step"]
        m.window = list(donor["window"])
        m.ready = [list(r) for r in donor.get("ready") or ()]

    def _maybe_close_generation(self, rng: np.random.Generator | None) -> None:
        alive = [m for m in self.members.values() if m.status in ("running", "waiting")]
        waiting = [m for m in alive if m.status == "waiting"]
        if not waiting or len(waiting) != len(alive):
            return
        # Donors are judged before recipients: every decision in a generation sees the scores
        # and states as they stood at the barrier, whatever other decisions change.
        barrier = {m.id: m.to_dict() for m in waiting}
        candidates = [self._candidate(m) for m in waiting if m.score is not None]
        rng = rng if rng is not None else derive_rng(self.seed, _RNG_GENERATION, self.generation)
        self.generation += 1
        for m in sorted(waiting, key=lambda m: m.id):
            m.status = "running"
            self._pending[m.id] = self._judge(m, candidates, rng, barrier.__getitem__)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The controller's whole state as plain, JSON-ready data."""
        return {
            "generation": self.generation,
            "members": [m.to_dict() for m in self.members.values()],
            "pending": self.pending_state(),
        }

    def pending_state(self) -> dict[str, Any]:
        """Synchronous mode: the decisions made but not yet polled, as plain data."""
        return {str(k): _decision_to_dict(d) for k, d in self._pending.items()}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Replaces this controller's state with one taken by `snapshot`."""
        self.generation = int(snapshot["generation"])
        self.members = {}
        for data in snapshot["members"]:
            m = MemberState.from_dict(data)
            self.members[m.id] = m
        self._pending = {int(k): _decision_from_dict(v) for k, v in snapshot["pending"].items()}

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description of the configuration (not the state)."""
        return {
            "space": self.space.describe(),
            "population_size": self.population_size,
            "interval": self.interval,
            "burn_in": self.burn_in,
            "steps": self.steps,
            "mode": self.mode,
            "exploit": None if self.exploit is None else self.exploit.describe(),
            "explore": None if self.explore is None else self.explore.describe(),
            "synchronous": self.synchronous,
            "seed": self.seed,
        }


def _decision_to_dict(d: Decision) -> dict[str, Any]:
    return {
        "action": d.action,
        "member": d.member,
        "step": d.step,
        "donor": d.donor,
        "donor_step": d.donor_step,
        "hparams": None if d.hparams is None else dict(d.hparams),
        "old_hparams": None if d.old_hparams is None else dict(d.old_hparams),
        "operations": dict(d.operations),
    }


def _decision_from_dict(data: Mapping[str, Any]) -> Decision:
    return Decision(
        action=data["action"],
        member=int(data["member"]),
        step=int(data["step"]),
        donor=data["donor"],
        donor_step=data["donor_step"],
        hparams=data["hparams"],
        old_hparams=data["old_hparams"],
        operations=dict(data["operations"]),
    )
