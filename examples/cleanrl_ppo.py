"""CleanRL's PPO on CartPole-v1, written again as a poptune member: PBT tunes lr, ent_coef,
clip_coef and gae_lambda while the agents train.

This is CleanRL's single-file ``ppo.py`` (vwxyzjn/cleanrl) turned into a `TorchTrainable`, with
its names (``Args``, ``Agent``, ``layer_init``, ``get_action_and_value``, ``num_steps``,
``clip_coef``, ...) and its algorithm unchanged: 4 CartPole environments in a
``SyncVectorEnv``; rollouts of ``num_steps`` x ``num_envs`` transitions; generalised advantage
estimation; ``update_epochs`` passes over the rollout in ``num_minibatches`` minibatches, each
with the clipped surrogate objective, the clipped value loss and an entropy bonus; Adam with
``eps=1e-5``, gradient-norm clipping and a linearly annealed learning rate. What PBT changes:

* **One poptune step** is ``updates_per_step`` PPO updates (each one rollout and its
  minibatch epochs). The member is ready every ``interval`` steps, when `pt.Truncation` lets
  the bottom quarter copy the top quarter (weights, Adam moments, random streams, counters)
  and `pt.Perturb` moves the copied hyperparameters (x0.8 or x1.2, or a redraw with
  probability 0.25).
* **Hyperparameters**: ``lr`` (log-uniform), ``ent_coef`` (log-uniform), ``clip_coef`` and
  ``gae_lambda``. They are set on the live member after every load (``hparam_targets``), so
  a copied optimizer state never brings back the donor's learning rate.
* **The learning-rate anneal starts from the member's current lr.** CleanRL sets
  ``lr = frac * args.learning_rate`` before every update, with ``frac`` falling linearly from 1
  to 0 over the run: under PBT that would bring back the *initial* lr at the next update and
  undo every perturbation. Here it is ``frac * lr``, where ``lr`` is the member's current
  hyperparameter (set again after every load) and ``frac`` counts the updates along the
  member's lineage, so a perturbed lr is the one in force, annealed like the rest.
* **Score** (metric ``"return"``): the mean return of the episodes finished during the step.
  A step is ``updates_per_step * num_steps`` = 1024 steps of each environment, more than the
  longest episode (500), so every step finishes at least one episode per environment.
* **The environments are the member's own** and are not in the checkpoint (a gymnasium
  environment cannot be checkpointed safely). A worker rebuilds a member (``setup`` runs again)
  whenever it takes it back after evicting it from its cache (with 8 members on 2 workers, at
  nearly every ready point; see ``docs/members.md``): the episodes in progress are lost, but the
  counters are kept in ``extra_state`` and the new environments are seeded from them and the
  member's own seed, so a rebuild starts new episodes instead of replaying the first ones.
  A member that copies another goes on in its own environments.

Two small departures from the file, both for gymnasium 1.x: the vector environment resets an
environment within the step that ends its episode (``AutoresetMode.SAME_STEP``: the old gym
behaviour ``ppo.py``'s ``next_done`` bookkeeping was written for), and the episodic returns are
summed in the loop instead of read from ``RecordEpisodeStatistics``' info, whose layout
changed between versions.

Run it:
    python examples/cleanrl_ppo.py [--smoke] [--baseline random] [--seed N]
                                   [--workers N --storage sqlite:///ppo.db]
    poptune run examples/cleanrl_ppo.py --baseline random --workers 2 --storage sqlite:///ppo.db

``poptune run`` takes ``EXPERIMENT``: its seed is ``$POPTUNE_EXAMPLE_SEED`` (default 0) and its
size ``$POPTUNE_EXAMPLE_SIZE`` (``default`` or ``smoke``), read when the file is imported; give
each seed its own run name (``--name``), and the same variables to ``poptune resume``.

Budget (default): 8 members x 24 steps x 8 updates x 512 transitions = 98,304 environment steps
per member (CleanRL's default run is 500k), ready every 4 steps (16,384 environment steps).
What to expect (``docs/examples.md``, 3 seeds, against random search at equal compute): the
best member reaches 500 either way; PBT's worst member ends at 382-492, random search's at
31-49 (members drawn with an lr near 1e-4 or below, which PBT replaces by copies of learners).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions.categorical import Categorical

import poptune as pt
from poptune.torch import TorchTrainable


@dataclass(frozen=True)
class Args:
    """CleanRL's arguments that PBT does not tune, and the population's size and clock."""

    env_id: str = "CartPole-v1"
    """The id of the environment (built into gymnasium: nothing to download)."""
    num_envs: int = 4
    """The number of parallel game environments."""
    num_steps: int = 128
    """The number of steps to run in each environment per policy rollout."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to 0 over the member's updates (from its current lr)."""
    gamma: float = 0.99
    """The discount factor gamma."""
    num_minibatches: int = 4
    """The number of minibatches a rollout is split into."""
    update_epochs: int = 4
    """The K epochs to update the policy on each rollout."""
    norm_adv: bool = True
    """Normalise the advantages within each minibatch."""
    clip_vloss: bool = True
    """Clip the value loss as the policy's (with the same ``clip_coef``), as in the PPO paper."""
    vf_coef: float = 0.5
    """Coefficient of the value loss."""
    max_grad_norm: float = 0.5
    """The maximum norm for the gradient clipping."""
    target_kl: float | None = None
    """Stop a rollout's epochs early once the approximate KL divergence exceeds this."""

    updates_per_step: int = 8
    """PPO updates (rollouts) in one poptune step."""
    population_size: int = 8
    """Members trained side by side."""
    steps: int = 24
    """Poptune steps each member trains for."""
    interval: int = 4
    """Steps between a member's ready points (where it may exploit and explore)."""

    @property
    def batch_size(self) -> int:
        """Transitions in one rollout."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        """PPO updates along a member's whole lineage: the anneal's horizon."""
        return self.steps * self.updates_per_step

    @property
    def total_timesteps(self) -> int:
        """Environment steps each member takes, all environments together."""
        return self.num_updates * self.batch_size


ARGS = {
    "default": Args(),
    # Real training on a tiny budget: 4 members, ready at every step, 3,072 transitions each.
    "smoke": Args(num_steps=64, updates_per_step=4, population_size=4, steps=3, interval=1),
}

SPACE = {
    "lr": pt.Float(1e-5, 1e-2, log=True),  # CleanRL: 2.5e-4
    "ent_coef": pt.Float(1e-4, 1e-1, log=True),  # CleanRL: 0.01
    "clip_coef": pt.Float(0.05, 0.5),  # CleanRL: 0.2
    "gae_lambda": pt.Float(0.8, 0.99),  # CleanRL: 0.95
}


# -- the agent: CleanRL's, unchanged ----------------------------------------------------------


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate MLPs (two hidden layers of 64, tanh) for the state value and the logits."""

    def __init__(self, n_obs: int, n_actions: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(n_obs, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(n_obs, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, n_actions), std=0.01),
        )

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()  # from the member's own torch stream
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


# -- the member -------------------------------------------------------------------------------


class PPOMember(TorchTrainable):
    """One PPO agent with its own environments (see the module docstring)."""

    args: ClassVar[Args] = ARGS["default"]
    hparam_targets: ClassVar[dict[str, Any]] = {
        "lr": lambda member, lr: member.set_lr(lr),
        "ent_coef": "ent_coef",  # the three below are read by ppo_update() and rollout()
        "clip_coef": "clip_coef",
        "gae_lambda": "gae_lambda",
    }

    def setup(self) -> None:
        args = self.args
        # A network this small runs fastest on one thread; more only wait for each other (and,
        # on a loaded machine, for every other process).
        torch.set_num_threads(1)
        self.envs = gym.vector.SyncVectorEnv(
            [lambda: gym.make(args.env_id)] * args.num_envs,
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        self.obs_shape: tuple[int, ...] = self.envs.single_observation_space.shape or ()
        n_obs = int(np.prod(self.obs_shape))
        n_actions = int(self.envs.single_action_space.n)  # type: ignore[attr-defined]
        self.agent = Agent(n_obs, n_actions).to(self.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=self.hparams["lr"], eps=1e-5)
        self.lr = float(self.hparams["lr"])
        self.ent_coef = float(self.hparams["ent_coef"])
        self.clip_coef = float(self.hparams["clip_coef"])
        self.gae_lambda = float(self.hparams["gae_lambda"])
        # Counted along the member's lineage (a copy takes the donor's), and checkpointed:
        self.global_step = 0  # environment steps
        self.update = 0  # PPO updates done: the anneal's clock
        self.episodes = 0  # episodes finished
        # The environments start on the first step (see start_episodes()).
        self.next_obs: torch.Tensor | None = None
        self.next_done = torch.zeros(args.num_envs, device=self.device)
        self.episode_return = np.zeros(args.num_envs)

    # setup() runs again whenever a worker rebuilds the member from a checkpoint; the counters
    # are plain data, so they go into the checkpoint and come back after every load (a donor's
    # at an exploit: they follow the weights).
    def extra_state(self) -> Any:
        return {"global_step": self.global_step, "update": self.update, "episodes": self.episodes}

    def load_extra_state(self, state: Any) -> None:
        self.global_step = int(state["global_step"])
        self.update = int(state["update"])
        self.episodes = int(state["episodes"])

    def set_lr(self, lr: float) -> None:
        """The member's lr hyperparameter, applied at once (after every load) with the anneal's
        factor for the updates done so far."""
        self.lr = float(lr)
        self.anneal_lr()

    def anneal_lr(self) -> None:
        """CleanRL's linear anneal, ``frac * lr``, from the member's current lr (not the one it
        started with): ``frac`` falls from 1 at the first update to ``1 / num_updates`` at the
        last one."""
        frac = 1.0 - self.update / self.args.num_updates if self.args.anneal_lr else 1.0
        self.optimizer.param_groups[0]["lr"] = frac * self.lr

    def start_episodes(self) -> None:
        """Resets freshly built environments with a seed of the member's own (``self.seed``,
        never a donor's) and of how far its lineage got, so that no rebuild replays the
        episodes an earlier build began with."""
        seed = np.random.SeedSequence([self.seed, self.global_step]).generate_state(1)[0]
        obs, _ = self.envs.reset(seed=int(seed) % 2**31)  # environment i gets seed + i
        self.next_obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        self.next_done.zero_()
        self.episode_return[:] = 0.0

    def step(self) -> dict[str, float]:
        if self.next_obs is None:
            self.start_episodes()
        finished: list[float] = []
        for _ in range(self.args.updates_per_step):
            self.anneal_lr()
            stats = self.ppo_update(self.rollout(finished))
            self.update += 1
        self.episodes += len(finished)
        return {
            "return": float(np.mean(finished)) if finished else math.nan,
            "episodes": float(len(finished)),
            "global_step": float(self.global_step),
            # The values in force, read back from the live objects.
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "ent_coef": self.ent_coef,
            "clip_coef": self.clip_coef,
            "gae_lambda": self.gae_lambda,
            **stats,  # the last update's losses, as CleanRL logs them
        }

    def rollout(self, finished: list[float]) -> dict[str, torch.Tensor]:
        """Runs the policy for ``num_steps`` in every environment; appends the return of every
        episode that ends to ``finished``; returns the flattened batch with its advantages."""
        args, device = self.args, self.device
        assert self.next_obs is not None  # start_episodes() ran
        shape = (args.num_steps, args.num_envs)
        obs = torch.zeros(shape + self.obs_shape, device=device)
        actions, logprobs, rewards, dones, values = (
            torch.zeros(shape, device=device) for _ in range(5)
        )
        for t in range(args.num_steps):
            self.global_step += args.num_envs
            obs[t], dones[t] = self.next_obs, self.next_done
            with torch.no_grad():
                action, logprob, _, value = self.agent.get_action_and_value(self.next_obs)
                values[t] = value.flatten()
            actions[t], logprobs[t] = action, logprob
            next_obs, reward, terminations, truncations, _ = self.envs.step(action.cpu().numpy())
            done = np.logical_or(terminations, truncations)
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            self.next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
            self.next_done = torch.as_tensor(done, dtype=torch.float32, device=device)
            self.episode_return += reward
            finished.extend(self.episode_return[done].tolist())
            self.episode_return[done] = 0.0

        # Bootstrap the value if not done; generalised advantage estimation.
        with torch.no_grad():
            next_value = self.agent.get_value(self.next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards)
            lastgaelam = torch.zeros(args.num_envs, device=device)
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal, nextvalues = 1.0 - self.next_done, next_value
                else:
                    nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                lastgaelam = delta + args.gamma * self.gae_lambda * nextnonterminal * lastgaelam
                advantages[t] = lastgaelam
            returns = advantages + values
        return {
            "obs": obs.reshape((-1, *self.obs_shape)),
            "logprobs": logprobs.reshape(-1),
            "actions": actions.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
            "values": values.reshape(-1),
        }

    def ppo_update(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        """Optimises the policy and value network on one rollout; returns CleanRL's logged
        statistics."""
        args = self.args
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        for _ in range(args.update_epochs):
            np.random.shuffle(b_inds)  # numpy's global stream: the member's own (TorchTrainable)
            for start in range(0, args.batch_size, args.minibatch_size):
                mb_inds = b_inds[start : start + args.minibatch_size]
                _, newlogprob, entropy, newvalue = self.agent.get_action_and_value(
                    b["obs"][mb_inds], b["actions"].long()[mb_inds]
                )
                logratio = newlogprob - b["logprobs"][mb_inds]
                ratio = logratio.exp()
                with torch.no_grad():
                    # http://joschu.net/blog/kl-approx.html
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > self.clip_coef).float().mean().item())

                mb_advantages = b["advantages"][mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (
                        mb_advantages.std() + 1e-8
                    )

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(
                    ratio, 1 - self.clip_coef, 1 + self.clip_coef
                )
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b["returns"][mb_inds]) ** 2
                    v_clipped = b["values"][mb_inds] + torch.clamp(
                        newvalue - b["values"][mb_inds], -self.clip_coef, self.clip_coef
                    )
                    v_loss_clipped = (v_clipped - b["returns"][mb_inds]) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b["returns"][mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - self.ent_coef * entropy_loss + v_loss * args.vf_coef

                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.agent.parameters(), args.max_grad_norm)
                self.optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b["values"].numpy(force=True), b["returns"].numpy(force=True)
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        return {
            "value_loss": v_loss.item(),
            "policy_loss": pg_loss.item(),
            "entropy": entropy_loss.item(),
            "approx_kl": approx_kl.item(),
            "clipfrac": float(np.mean(clipfracs)),
            "explained_variance": float(explained_var),
        }


class SmokePPOMember(PPOMember):
    """The same agent on the smoke budget (its anneal spans the smoke run's updates)."""

    args: ClassVar[Args] = ARGS["smoke"]


# -- the experiment ---------------------------------------------------------------------------


def experiment(seed: int = 0, size: str = "default", baseline: str | None = None) -> pt.Experiment:
    """PBT (truncation exploit, perturb explore) over ``ARGS[size]``; with
    ``baseline="random"``, random search at the same compute: the same population drawn from
    the same prior, trained for the same steps, never exploiting or exploring."""
    if size not in ARGS:
        raise ValueError(f"`size` must be one of {sorted(ARGS)}, but got {size!r}.")
    if baseline not in (None, "random"):
        raise ValueError(f"`baseline` must be None or 'random', but got {baseline!r}.")
    args = ARGS[size]
    pbt = baseline is None
    return pt.Experiment(
        trainable=PPOMember if size == "default" else SmokePPOMember,
        space=SPACE,
        population_size=args.population_size,
        steps=args.steps,
        interval=args.interval,
        metric="return",
        mode="max",
        exploit=pt.Truncation(0.25) if pbt else None,
        explore=pt.Perturb() if pbt else None,
        seed=seed,
    )


def from_environment(build: Callable[..., pt.Experiment]) -> pt.Experiment:
    """``build(seed, size)`` with ``$POPTUNE_EXAMPLE_SEED`` and ``$POPTUNE_EXAMPLE_SIZE``."""
    return build(
        seed=int(os.environ.get("POPTUNE_EXAMPLE_SEED", "0")),
        size=os.environ.get("POPTUNE_EXAMPLE_SIZE", "default"),
    )


# `poptune run examples/cleanrl_ppo.py` picks this one up.
EXPERIMENT = from_environment(experiment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (seconds)")
    parser.add_argument("--baseline", choices=["random"], help="random search instead of PBT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--storage", metavar="URL", help="e.g. sqlite:///ppo.db (default: memory)")
    args = parser.parse_args()
    if args.workers > 1 and not args.storage:
        parser.error("--workers > 1 needs --storage (worker processes share it)")
    size = "smoke" if args.smoke else "default"
    exp = experiment(args.seed, size, args.baseline)
    name = f"cleanrl_ppo-{size}-{args.baseline or 'pbt'}-seed{args.seed}"
    result = exp.run(args.storage, name, workers=args.workers) if args.storage else exp.run()
    finals = sorted((m.score for m in result.members if m.score is not None), reverse=True)
    exploits = sum(e.kind == "exploit" for e in result.events)
    print(
        f"{'random search' if args.baseline else 'PBT'} ({size}, seed {args.seed}, "
        f"{ARGS[size].total_timesteps:,} environment steps per member): final return of the "
        f"members {', '.join(f'{s:.0f}' for s in finals)}; {exploits} exploits"
    )
    print("hyperparameters along the best member's ancestry, at each ready point:")
    for s in result.schedule()[:: ARGS[size].interval]:
        values = ", ".join(f"{k} {v:.3g}" for k, v in s.hparams.items())
        print(f"  step {s.step:>3} (member {s.member}): {values}")


if __name__ == "__main__":
    main()
