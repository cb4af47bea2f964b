"""A GAN on 8x8 digits: PBT tunes the generator's and discriminator's learning rates.

The paper's GAN domain (Jaderberg et al. 2017, section 4.3) in miniature. Eight members train
a small MLP generative adversarial network on scikit-learn's bundled 8x8 handwritten digits
(1797 images; no download). Each member has its own Adam learning rates for the generator
(``lr_g``) and the discriminator (``lr_d``), drawn log-uniformly from [1e-5, 1e-2]. A member
trains 24 steps of 200 updates and is ready every 4 steps (800 updates); then, as in the paper,
it exploits by *binary tournament* (it copies one member drawn at random if that member scores
higher: weights, Adam moments, random streams and learning rates) and explores by *perturbing*
the copied learning rates (x0.8 or x1.2 each, or a redraw from the prior with probability 0.25).

The score is an Inception score, ``IS = exp(E_x KL(p(y|x) || p(y)))``, computed with a small
digits classifier this example trains on the real digits once and caches in
``$XDG_CACHE_HOME/poptune`` (``~/.cache/poptune``). It is 1 when every sample gets the same
label and at most 10 (ten classes, each sample classified with certainty); the real digits
score 9.69, uniform noise about 2.9. Every evaluation classifies the same 2000 latent vectors,
so scores differ between members, and between steps, only through the generators.

What to expect (default size, 2 cores; the final score of the best member and the median
member; random search trains the same 8 members for the same 24 steps without exploit/explore):

    seed   PBT best  PBT median   random best  random median
       0       8.24        7.91          8.25           5.40
       1       8.00        7.64          8.25           3.31

PBT rescues the population (in random search several members never learn: IS near 1), but its
best is no better than random search's best on these seeds, which each drew one lucky member
(``lr_g`` 2e-3 to 5e-3 with ``lr_d`` about 4.5 times lower). The tournament is greedy: such a
member starts slower than members with a higher ``lr_d`` and is copied over before it can
overtake them (seed 1: at step 12, scoring 6.2 against 7 and more), the short-horizon bias of
PBT. The schedules PBT found do move toward the same
region: ``lr_d`` falls during training (seed 0: 2.8e-3 to 1.4e-3; seed 1: 4.0e-3 to 5.6e-4)
and ends below ``lr_g`` (seed 0: ``lr_g`` resampled to 5.9e-3 at step 12, then 7.1e-3).

Run it:
    python examples/gan_digits.py                      # PBT, 8 members, about 2 minutes
    python examples/gan_digits.py --baseline random    # random search at the same compute
    python examples/gan_digits.py --smoke              # a few seconds
    python examples/gan_digits.py --workers 2 --storage sqlite:///gan.db
    poptune run examples/gan_digits.py --workers 2     # stored in ./poptune.db

It prints the best member's Inception score, the population's median, and the learning rates
along the best member's ancestry (the value in force from each ready point on).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import poptune as pt
from poptune.torch import TorchTrainable

# -- configuration ----------------------------------------------------------------------------

INTERVAL = 4  # steps between a member's ready points; both sizes share it (`summary` reads it)


@dataclass(frozen=True)
class Config:
    """One size of the experiment: population, budget, models and evaluation."""

    population_size: int = 8
    """Members trained side by side."""
    steps: int = 24
    """Steps each member trains for (a step is ``updates_per_step`` updates of D and G)."""
    updates_per_step: int = 200
    """Discriminator-then-generator updates in one step."""
    batch_size: int = 64
    """Real digits (and generated samples) per update."""
    latent_dim: int = 16
    """Size of the generator's Gaussian input."""
    hidden: int = 128
    """Width of the two hidden layers of the generator and of the discriminator."""
    eval_samples: int = 2000
    """Generated samples the Inception score is computed over (the same latents every time)."""
    lr_low: float = 1e-5
    """Lower bound of both learning rates' log-uniform prior."""
    lr_high: float = 1e-2
    """Upper bound of both learning rates' log-uniform prior."""


SIZES = {
    "default": Config(),
    # Real training on a tiny budget: 12 steps of 15 updates, ready at steps 4 and 8.
    "smoke": Config(population_size=4, steps=12, updates_per_step=15, eval_samples=500),
}
EVAL_SEED = 1234  # the evaluation latents, the same for every member and every step
CACHE_VERSION = 1  # bump when the classifier's recipe changes: a new cache file is built

# -- data -------------------------------------------------------------------------------------


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 bundled 8x8 digits, pixels scaled from [0, 16] to [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 8.0 - 1.0
    return x, torch.tensor(data.target, dtype=torch.long)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs torch on one thread: these nets are too small to gain from more, and on a loaded
    2-core machine two threads made an update 25x slower (48 ms instead of 1.9 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the digits classifier behind the Inception score ----------------------------------------


def classifier_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cache_dir() -> Path:
    """Where the classifier is cached: ``$XDG_CACHE_HOME/poptune``, else ``~/.cache/poptune``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "poptune"


def train_classifier() -> nn.Module:
    """A digits classifier trained on 1500 of the real digits (it gets 98% of the other 297
    right).

    Seeded with its own generators, so building it neither reads nor moves any member's random
    streams, and every process builds the same one.
    """
    x, y = digits()
    gen = torch.Generator().manual_seed(0)
    train = torch.randperm(len(x), generator=gen)[:1500]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = classifier_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    with one_thread(), torch.enable_grad():  # enable_grad: it may be built inside an evaluation
        for _ in range(300):  # full batch; about a second
            # Light pixel noise as augmentation: a classifier less brittle off the real digits.
            noisy = x[train] + 0.1 * torch.randn(len(train), 64, generator=gen)
            loss = F.cross_entropy(net(noisy), y[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@functools.cache
def classifier() -> nn.Module:
    """The cached classifier (built and saved on first use, in any process).

    Two processes may build it at once: each writes a temporary file and renames it into
    place (atomic), so a reader never sees half a file.
    """
    path = cache_dir() / f"digits-classifier-v{CACHE_VERSION}.pt"
    net = classifier_net()
    try:
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    except Exception:  # missing, unreadable or from another recipe: build it again
        pass
    net = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(net.state_dict(), f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return net


@torch.no_grad()
def inception_score(samples: torch.Tensor) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` under the digits classifier: from 1 to 10."""
    net = classifier().to(samples.device)
    log_p = F.log_softmax(net(samples), dim=1)  # log p(y|x), one row per sample
    log_py = torch.logsumexp(log_p, dim=0) - math.log(len(samples))  # log of the mean p(y|x)
    kl = (log_p.exp() * (log_p - log_py)).sum(dim=1).mean()
    return float(kl.exp())


# -- models -----------------------------------------------------------------------------------


def generator(cfg: Config) -> nn.Module:
    return nn.Sequential(
        nn.Linear(cfg.latent_dim, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, 64),
        nn.Tanh(),  # pixels in [-1, 1], like the data
    )


def discriminator(cfg: Config) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, cfg.hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(cfg.hidden, 1),  # a logit: real or generated
    )


# -- the member -------------------------------------------------------------------------------


class GANMember(TorchTrainable):
    """One member: a generator, a discriminator and their Adam optimizers.

    Everything that must survive an exploit is an ``nn.Module`` or optimizer attribute, which
    `TorchTrainable` checkpoints with the member's random streams; the data and the evaluation
    latents are the same for every member and are not part of the state.
    """

    config: ClassVar[Config] = SIZES["default"]
    hparam_targets: ClassVar[dict[str, Any]] = {"lr_g": "opt_g.lr", "lr_d": "opt_d.lr"}

    def setup(self) -> None:
        cfg = self.config
        self.data = digits()[0].to(self.device)
        self.gen = generator(cfg).to(self.device)
        self.disc = discriminator(cfg).to(self.device)
        # beta1 = 0.5: the usual choice for GANs (DCGAN); the paper tunes only the lrs.
        betas = (0.5, 0.999)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=self.hparams["lr_g"], betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.hparams["lr_d"], betas=betas)
        classifier()  # built (or loaded) now, so that no step pays for it
        latents = torch.Generator().manual_seed(EVAL_SEED)
        self.eval_z = torch.randn(cfg.eval_samples, cfg.latent_dim, generator=latents)
        self.eval_z = self.eval_z.to(self.device)

    def step(self) -> dict[str, float]:
        cfg, n = self.config, self.config.batch_size
        ones = torch.ones(n, 1, device=self.device)
        zeros = torch.zeros(n, 1, device=self.device)
        with one_thread():
            for _ in range(cfg.updates_per_step):
                real = self.data[torch.randint(len(self.data), (n,), device=self.device)]
                fake = self.gen(torch.randn(n, cfg.latent_dim, device=self.device))
                loss_d = F.binary_cross_entropy_with_logits(
                    self.disc(real), ones
                ) + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), zeros)
                self.opt_d.zero_grad()
                loss_d.backward()
                self.opt_d.step()
                # The non-saturating generator loss: make D call the samples real.
                loss_g = F.binary_cross_entropy_with_logits(self.disc(fake), ones)
                self.opt_g.zero_grad()
                loss_g.backward()
                self.opt_g.step()
            with torch.no_grad():
                score = inception_score(self.gen(self.eval_z))
        return {"inception": score, "loss_d": loss_d.item(), "loss_g": loss_g.item()}


class SmokeGANMember(GANMember):
    """The same member on the smoke budget (fewer updates per step, fewer samples scored)."""

    config: ClassVar[Config] = SIZES["smoke"]


# -- the experiment ---------------------------------------------------------------------------


def experiment(seed: int = 0, size: str = "default", baseline: str | None = None) -> pt.Experiment:
    """PBT on the GAN (``baseline=None``), or random search at the same compute
    (``baseline="random"``: the same population and steps, no exploit, no explore).

    Args:
        seed: Seeds the initial learning rates, every member's streams and every decision.
        size: ``"default"`` (8 members, 24 steps of 200 updates) or ``"smoke"`` (seconds).
        baseline: None for PBT, ``"random"`` for random search.
    """
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {sorted(SIZES)}, but got {size!r}.")
    if baseline not in (None, "random"):
        raise ValueError(f"`baseline` must be None or 'random', but got {baseline!r}.")
    cfg = SIZES[size]
    search: dict[str, Any] = (
        {"exploit": pt.Tournament(), "explore": pt.Perturb()}
        if baseline is None
        else {"exploit": None, "explore": None}
    )
    return pt.Experiment(
        trainable=GANMember if size == "default" else SmokeGANMember,
        space={
            "lr_g": pt.Float(cfg.lr_low, cfg.lr_high, log=True),
            "lr_d": pt.Float(cfg.lr_low, cfg.lr_high, log=True),
        },
        population_size=cfg.population_size,
        steps=cfg.steps,
        interval=INTERVAL,
        metric="inception",
        mode="max",
        seed=seed,
        **search,
    )


# `poptune run examples/gan_digits.py` picks this one up.
EXPERIMENT = experiment()


def summary(result: pt.Result) -> dict[str, Any]:
    """The best member's score and its learning-rate schedule, compactly.

    Returns ``{"best": score, "schedule": {"lr_g": [[step, value], ...], "lr_d": [...]}}``,
    with one ``[step, value]`` per ready point along the best member's ancestry: the value in
    force for the steps after ``step`` (``step`` 0 is the start).
    """
    best = result.best
    schedule = result.schedule(best.id)
    points = [s for s in schedule if (s.step - 1) % INTERVAL == 0]
    return {
        "best": float(best.score) if best.score is not None else math.nan,
        "schedule": {
            name: [[s.step - 1, float(s.hparams[name])] for s in points]
            for name in ("lr_g", "lr_d")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (seconds)")
    parser.add_argument("--baseline", choices=["random"], help="random search instead of PBT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--storage", metavar="URL", help="e.g. sqlite:///gan.db (default: memory)")
    args = parser.parse_args()
    size = "smoke" if args.smoke else "default"
    exp = experiment(args.seed, size, args.baseline)
    name = f"gan_digits-{size}-{args.baseline or 'pbt'}-seed{args.seed}"
    if args.storage is None and args.workers > 1:
        parser.error("--workers > 1 needs --storage (worker processes share it)")
    result = exp.run(args.storage, name, workers=args.workers) if args.storage else exp.run()
    out = summary(result)
    exploits = sum(e.kind == "exploit" for e in result.events)
    scores = [m.score if m.score is not None else math.nan for m in result.members]
    print(
        f"{'random search' if args.baseline else 'PBT'} ({size}, seed {args.seed}): "
        f"best Inception score {out['best']:.3f} (member {result.best.id}), population median "
        f"{float(np.nanmedian(scores)):.3f}, {exploits} exploits; real digits score "
        f"{inception_score(digits()[0]):.2f}"
    )
    print("schedule along the best member's ancestry (step: lr_g, lr_d):")
    for (step, lr_g), (_, lr_d) in zip(
        out["schedule"]["lr_g"], out["schedule"]["lr_d"], strict=True
    ):
        print(f"  {step:>4}: {lr_g:.2e}  {lr_d:.2e}")


if __name__ == "__main__":
    main()
