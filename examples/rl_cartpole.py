"""PBT for reinforcement learning: PPO agents on CartPole-v1, tuning the paper's UNREAL set.

The PBT paper's first domain is deep RL: A3C/UNREAL agents whose learning rate, entropy cost
and unroll length PBT adapts during training, exploiting with Welch's t-test on recent episodic
returns and exploring by perturbation. This example does the same at laptop scale: each member
is a PPO agent (an actor-critic with clipped policy updates, chosen over A2C because it learns
CartPole in the fewest environment steps, and environment steps are what 2 CPU cores are short
of) on gymnasium's built-in, numpy-vectorised ``CartPole-v1`` (no download).

* **Hyperparameters**: ``lr`` (Adam's learning rate, log-uniform), ``entropy_cost`` (weight of
  the entropy bonus, log-uniform) and ``unroll_length`` (environment steps per environment in
  one rollout, an integer, log-uniform). The unroll length sets the rollout's size, not the
  network's shape, so it is mutable like the others: a member that copies another simply
  collects its next rollout with the new length. All three are set on the live member after
  every load (``hparam_targets``): the optimizer's param groups, and the two attributes the
  training loop reads.
* **One PBT step** is a fixed budget of environment steps (``env_steps_per_step`` per
  environment, whatever the unroll length: a longer unroll means fewer, larger rollouts and
  PPO updates). The budget exceeds the longest episode (500 steps), so every environment
  finishes at least one episode in each step.
* **Score** (metric ``"return"``): the mean return of the episodes finished during the step.
  `pt.TTest(window=10)` compares a member's last 10 reported scores with those of a member drawn
  at random and copies it when its mean is significantly higher (Welch's t-test, alpha 0.05);
  `pt.Perturb()` then multiplies each hyperparameter by 0.8 or 1.2.
* **The environment is the member's own** and is not in the checkpoint, like the noise of
  ``examples/lr_schedule.py``: each member builds its environments seeded from its seed, and a
  member that copies another takes the donor's network, optimizer state, random streams and
  hyperparameters but goes on in its *own* environments (its episodes in progress included).
  A member is *rebuilt* (``setup`` runs again) whenever a worker process takes it back after
  evicting it from its cache of live members (with 8 members on 2 workers, at nearly every
  ready point), or in a resumed run: see ``docs/members.md``. Environments cannot be
  checkpointed safely, so a rebuilt member loses its episodes in progress; what it keeps, as
  plain data in ``extra_state``, is its counters (environment steps and episodes along its
  lineage), and it reseeds its new environments from them and its own seed, so that a rebuild
  starts new episodes instead of replaying the seed's first ones again. The run goes on
  correctly, but does not replay episode for episode.

Run it:  python examples/rl_cartpole.py [--smoke] [--baseline random] [--seed N]
                                        [--workers N --storage runs.db]
or:      poptune run examples/rl_cartpole.py

It prints, for PBT (and random search at the same compute with ``--baseline random``): the
best member's latest return; the population's mean return over its last ready interval and how
many members averaged at least 475 (CartPole-v1's "solved" threshold) there; then the schedule
PBT found (the hyperparameters at every ready interval along the best member's ancestry).

For scale: a random policy scores about 22; CleanRL's PPO (lr 2.5e-4) reaches about 489 after
500k environment steps. A member here trains for 163,840 (40 steps of 8 environments x 512);
the default run takes about 2 minutes on one core of this project's 2-core machines, ``--smoke``
about 15 s. The best members, drawn with a learning rate near 5e-3, reach 500 within 20k-50k
steps whether or not PBT runs; PBT's gain is the rest of the population: members drawn with a
learning rate around 1e-4 or below copy a learner and reach 500 too, where under random search
they are still far from it at the end. Seed 0: all 8 members average 500 over the last ready
interval with PBT, 4 of 8 with random search (population mean 361); seed 1: 8 of 8 against 5
of 8 (mean 378).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import poptune as pt
from poptune.torch import TorchTrainable

MAX_EPISODE_STEPS = 500  # CartPole-v1's time limit


@dataclass(frozen=True)
class Config:
    """The agent's fixed settings: its environments, its network and PPO's constants."""

    num_envs: int = 8
    """CartPole environments each member steps in one batch (gymnasium's vectorised CartPole)."""
    env_steps_per_step: int = 512
    """Environment steps per environment in one PBT step; more than 500 (the longest episode)
    so that every environment finishes an episode, and every step has a score."""
    hidden: int = 64
    """Width of the two hidden layers of the actor and of the critic."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """Lambda of generalised advantage estimation."""
    clip: float = 0.2
    """PPO's clipping range for the probability ratio."""
    epochs: int = 4
    """Passes over each rollout."""
    minibatch_size: int = 256
    """Transitions per gradient step (a smaller rollout is one minibatch)."""
    value_cost: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Gradient norm clipping."""

    def __post_init__(self) -> None:
        if self.env_steps_per_step <= MAX_EPISODE_STEPS:
            raise ValueError(
                f"`env_steps_per_step > {MAX_EPISODE_STEPS}` must hold (each environment must "
                f"finish an episode in every step), but got {self.env_steps_per_step}."
            )

    @property
    def frames_per_step(self) -> int:
        """Environment steps a member takes in one PBT step, all environments together."""
        return self.num_envs * self.env_steps_per_step


@dataclass(frozen=True)
class Size:
    """How much PBT there is: the population and its clock."""

    population_size: int = 8
    """Members trained side by side."""
    steps: int = 40
    """PBT steps each member trains for."""
    interval: int = 4
    """Steps between a member's ready points (where it may exploit and explore)."""


CONFIG = Config()
SIZES = {
    "default": Size(),
    # Still real training: 8 members, ready at every step; each sees 20,480 environment steps.
    "smoke": Size(steps=5, interval=1),
}

# The paper's UNREAL set: learning rate and entropy cost log-uniform, unroll length an integer.
SPACE = {
    "lr": pt.Float(1e-5, 1e-2, log=True),
    "entropy_cost": pt.Float(1e-4, 1e-1, log=True),
    "unroll_length": pt.Int(8, 256, log=True),
}


# -- the agent --------------------------------------------------------------------------------


def layer(n_in: int, n_out: int, std: float = math.sqrt(2)) -> nn.Linear:
    """A linear layer with orthogonal weights and zero bias (PPO's usual initialisation)."""
    linear = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(linear.weight, std)
    nn.init.zeros_(linear.bias)
    return linear


class ActorCritic(nn.Module):
    """Separate MLPs for the policy's logits and the state value."""

    def __init__(self, n_obs: int, n_actions: int, hidden: int) -> None:
        super().__init__()
        self.actor = nn.Sequential(
            layer(n_obs, hidden),
            nn.Tanh(),
            layer(hidden, hidden),
            nn.Tanh(),
            layer(hidden, n_actions, std=0.01),
        )
        self.critic = nn.Sequential(
            layer(n_obs, hidden),
            nn.Tanh(),
            layer(hidden, hidden),
            nn.Tanh(),
            layer(hidden, 1, std=1.0),
        )

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of every action, and the state value."""
        return torch.log_softmax(self.actor(obs), dim=-1), self.value(obs)


# -- the member -------------------------------------------------------------------------------


class CartPoleMember(TorchTrainable):
    """One PPO agent with its own CartPole environments (see the module docstring)."""

    config: ClassVar[Config] = CONFIG
    hparam_targets: ClassVar[dict[str, Any]] = {
        "lr": "optimizer.lr",
        "entropy_cost": "entropy_cost",  # read by update()
        "unroll_length": "unroll_length",  # read by step()
    }

    def setup(self) -> None:
        cfg = self.config
        # A network this small runs fastest on one thread: more only wait for each other (and
        # under load, for the other processes on the machine).
        torch.set_num_threads(1)
        # NEXT_STEP autoreset: the step after an episode ends returns the reset observation, with
        # reward 0, whatever the action; that transition is masked out of the loss below.
        self.envs = gym.make_vec(
            "CartPole-v1", num_envs=cfg.num_envs, vectorization_mode="vector_entry_point"
        )
        self.obs, _ = self.envs.reset(seed=self.seed % 2**31)
        self.resetting = np.zeros(cfg.num_envs, dtype=bool)  # the next step is a reset
        self.running_return = np.zeros(cfg.num_envs)
        n_actions = int(self.envs.single_action_space.n)  # type: ignore[attr-defined]
        self.agent = ActorCritic(self.obs.shape[1], n_actions, cfg.hidden).to(self.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=self.hparams["lr"], eps=1e-5)
        self.entropy_cost = float(self.hparams["entropy_cost"])
        self.unroll_length = int(self.hparams["unroll_length"])
        self.frames = 0  # environment steps along this state's lineage
        self.episodes = 0  # episodes finished along this state's lineage
        self.fresh_envs = True  # reset from the member's seed, not stepped yet

    # setup() runs again each time a worker rebuilds this member from its checkpoint, and the
    # environments above start again from the member's seed: their episodes in progress are
    # lost (a gymnasium environment cannot be checkpointed safely), and each rebuild would
    # replay the same first episodes. The counters are plain data, so they are checkpointed
    # here; step() reseeds rebuilt environments from them (see reseed()).
    def extra_state(self) -> Any:
        return {"frames": self.frames, "episodes": self.episodes}

    def load_extra_state(self, state: Any) -> None:
        self.frames = int(state["frames"])
        self.episodes = int(state.get("episodes", 0))

    def reseed(self) -> None:
        """Resets freshly built environments with a seed of the member's own (``self.seed``:
        never the donor's) and of how far its lineage got, so that no rebuild replays the
        episodes an earlier one began with."""
        seed = np.random.SeedSequence([self.seed, self.frames]).generate_state(1)[0]
        self.obs, _ = self.envs.reset(seed=int(seed) % 2**31)
        self.resetting[:] = False
        self.running_return[:] = 0.0

    def step(self) -> dict[str, float]:
        if self.fresh_envs and self.frames:  # rebuilt from a checkpoint (or a donor's)
            self.reseed()
        self.fresh_envs = False
        rollouts = math.ceil(self.config.env_steps_per_step / self.unroll_length)
        finished: list[float] = []
        stats = [self.update(self.collect(finished)) for _ in range(rollouts)]
        self.episodes += len(finished)
        return {
            "return": float(np.mean(finished)),
            "episodes": float(len(finished)),
            "frames": float(self.frames),
            "episodes_total": float(self.episodes),
            "entropy": float(np.mean([s[0] for s in stats])),
            "value_loss": float(np.mean([s[1] for s in stats])),
            # The values in force, read back from the live objects.
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "entropy_cost": self.entropy_cost,
            "unroll_length": float(self.unroll_length),
        }

    def policy(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples an action for each observation: actions, their log-probabilities, values."""
        with torch.no_grad():
            logp, value = self.agent(torch.from_numpy(obs).to(self.device))
            # Inverse-CDF sampling from the member's torch stream (cheaper than multinomial).
            u = torch.rand((len(obs), 1), device=self.device)
            action = (logp.exp().cumsum(-1) < u).sum(-1).clamp_max(logp.shape[-1] - 1)
            chosen = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action.cpu().numpy(), chosen.cpu().numpy(), value.cpu().numpy()

    def collect(self, finished: list[float]) -> dict[str, torch.Tensor]:
        """Steps the environments ``unroll_length`` times with the current policy; appends the
        return of every episode that ends to ``finished``; returns the rollout with its
        advantages and value targets."""
        cfg, t_max, n = self.config, self.unroll_length, self.config.num_envs
        obs = np.zeros((t_max, *self.obs.shape), dtype=np.float32)
        actions = np.zeros((t_max, n), dtype=np.int64)
        logprobs, values, rewards = (np.zeros((t_max, n), dtype=np.float32) for _ in range(3))
        terminated, done, valid = (np.zeros((t_max, n), dtype=bool) for _ in range(3))
        for t in range(t_max):
            obs[t], valid[t] = self.obs, ~self.resetting
            actions[t], logprobs[t], values[t] = self.policy(self.obs)
            self.obs, rewards[t], terminated[t], truncated, _ = self.envs.step(actions[t])
            done[t] = terminated[t] | truncated
            self.running_return += rewards[t]
            finished.extend(self.running_return[done[t]].tolist())
            self.running_return[done[t]] = 0.0
            self.resetting = done[t]
        self.frames += t_max * n

        # Generalised advantage estimation. A truncated episode (500 steps) bootstraps from the
        # value of its last observation, which NEXT_STEP autoreset hands back; the chain of
        # advantages stops at every episode's end.
        next_value = self.policy(self.obs)[2]
        advantages = np.zeros((t_max, n), dtype=np.float32)
        carry = np.zeros(n, dtype=np.float32)
        for t in reversed(range(t_max)):
            delta = rewards[t] + cfg.gamma * next_value * ~terminated[t] - values[t]
            carry = delta + cfg.gamma * cfg.gae_lambda * carry * ~done[t]
            advantages[t], next_value = carry, values[t]
        keep = valid.reshape(-1)
        batch = {
            "obs": obs.reshape(t_max * n, -1),
            "actions": actions.reshape(-1),
            "logprobs": logprobs.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": (advantages + values).reshape(-1),
        }
        return {k: torch.from_numpy(v[keep]).to(self.device) for k, v in batch.items()}

    def update(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """PPO's clipped-objective updates on one rollout; returns the mean entropy and value
        loss of the last epoch."""
        cfg = self.config
        size = len(batch["actions"])
        entropies, value_losses = [], []
        for _ in range(cfg.epochs):
            entropies.clear()
            value_losses.clear()
            order = torch.randperm(size)
            for start in range(0, size, cfg.minibatch_size):
                idx = order[start : start + cfg.minibatch_size].to(self.device)
                logp_all, value = self.agent(batch["obs"][idx])
                logp = logp_all.gather(-1, batch["actions"][idx].unsqueeze(-1)).squeeze(-1)
                adv = batch["advantages"][idx]
                if len(idx) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = (logp - batch["logprobs"][idx]).exp()
                policy_loss = -torch.min(
                    ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv
                ).mean()
                value_loss = 0.5 * (value - batch["returns"][idx]).pow(2).mean()
                entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
                loss = policy_loss + cfg.value_cost * value_loss - self.entropy_cost * entropy
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                entropies.append(float(entropy.detach()))
                value_losses.append(float(value_loss.detach()))
        return float(np.mean(entropies)), float(np.mean(value_losses))


# -- the experiment ---------------------------------------------------------------------------


def experiment(seed: int = 0, size: str = "default", baseline: str | None = None) -> pt.Experiment:
    """PBT (t-test exploit, perturb explore) over ``SIZES[size]``; with ``baseline="random"``,
    random search: the same population drawn from the same prior, trained for the same steps,
    never exploiting or exploring."""
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {sorted(SIZES)}, but got {size!r}.")
    if baseline not in (None, "random"):
        raise ValueError(f"`baseline` must be None or 'random', but got {baseline!r}.")
    sz = SIZES[size]
    pbt = baseline is None
    return pt.Experiment(
        trainable=CartPoleMember,
        space=SPACE,
        population_size=sz.population_size,
        steps=sz.steps,
        interval=sz.interval,
        metric="return",
        mode="max",
        exploit=pt.TTest(window=10) if pbt else None,
        explore=pt.Perturb() if pbt else None,
        seed=seed,
    )


# `poptune run examples/rl_cartpole.py` picks this one up.
EXPERIMENT = experiment()


def summary(result: pt.Result) -> dict[str, Any]:
    """The best member's latest return, and the schedule along its ancestry, compactly: for
    each hyperparameter, ``[step, value]`` at step 1 and at every step where a new stretch of
    training began (an exploit and explore along the ancestry); the value holds until the next.
    """
    marks: dict[str, list[list[float]]] = {name: [] for name in SPACE}
    previous: tuple[int, dict[str, Any]] | None = None
    for s in result.schedule():
        current = (s.member, dict(s.hparams))
        if current != previous:
            for name in SPACE:
                marks[name].append([s.step, float(s.hparams[name])])
        previous = current
    best = result.best.score
    return {"best": math.nan if best is None else float(best), "schedule": marks}


def schedule_table(result: pt.Result, interval: int) -> str:
    """The hyperparameters along the best member's ancestry at every ready interval."""
    lines = [f"{'steps':>9} {'member':>6} {'lr':>9} {'entropy_cost':>12} {'unroll_length':>13}"]
    for s in result.schedule()[::interval]:
        h = s.hparams
        steps = f"{s.step:>4}-{s.step + interval - 1:<4}" if interval > 1 else f"{s.step:>9}"
        lines.append(
            f"{steps} {s.member:>6} {h['lr']:>9.2e} {h['entropy_cost']:>12.2e} "
            f"{h['unroll_length']:>13}"
        )
    return "\n".join(lines)


SOLVED = 475.0  # CartPole-v1's "solved" threshold (gymnasium's reward_threshold)


def outcome(result: pt.Result, last: int) -> dict[str, float]:
    """The best member's latest return; and over each member's last ``last`` steps, its mean
    return, averaged over the population, and how many members averaged at least SOLVED."""
    end = max(r.step for r in result.history)
    finals = [
        float(
            np.mean([r.score for r in result.history if r.member == m.id and r.step > end - last])
        )
        for m in result.members
    ]
    best = result.best.score
    return {
        "best": math.nan if best is None else float(best),
        "population": float(np.mean(finals)),
        "solved": float(sum(f >= SOLVED for f in finals)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (under 30 s)")
    parser.add_argument("--baseline", choices=["random"], help="also run random search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (needs --storage)")
    parser.add_argument("--storage", help="record the runs there, e.g. runs.db (default: memory)")
    args = parser.parse_args()
    if args.workers > 1 and not args.storage:
        parser.error("--workers > 1 needs a storage the workers share: add --storage runs.db")
    size = "smoke" if args.smoke else "default"
    sz = SIZES[size]
    print(
        f"CartPole-v1, PPO: {sz.population_size} members x {sz.steps} steps "
        f"({sz.steps * CONFIG.frames_per_step:,} environment steps each), ready every "
        f"{sz.interval}, seed {args.seed}"
    )
    print(
        f"{'variant':<14}{'best return':>12}{f'population, last {sz.interval} step(s)':>29}"
        f"{'exploits':>10}{'time':>7}"
    )
    variants = [("PBT", None)] + ([("random search", "random")] if args.baseline else [])
    results = {}
    for label, baseline in variants:
        start = time.perf_counter()
        exp = experiment(args.seed, size, baseline)
        if args.storage:
            name = f"rl_cartpole-{size}-{baseline or 'pbt'}-{args.seed}"
            result = exp.run(args.storage, name, workers=args.workers)
        else:
            result = exp.run()
        results[label] = result
        out = outcome(result, sz.interval)
        n = len(result.members)
        population = f"mean {out['population']:5.1f}, {out['solved']:.0f}/{n} >= {SOLVED:g}"
        print(
            f"{label:<14}{out['best']:>12.1f}{population:>29}{len(result.events):>10}"
            f"{time.perf_counter() - start:>6.0f}s"
        )
    print(f"\nSchedule PBT found (best member's ancestry, every {sz.interval} step(s)):")
    print(schedule_table(results["PBT"], sz.interval))


if __name__ == "__main__":
    main()
