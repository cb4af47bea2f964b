"""Machine translation with a small Transformer: PBT finds a learning-rate schedule.

The PBT paper's translation experiment (Jaderberg et al. 2017, section 4.2), shrunk to a CPU:
a population of Transformers tunes the learning rate and the three dropouts the paper tuned
(attention, layer and ReLU dropout), scored by BLEU on held-out sentences with greedy
decoding. The paper found that PBT discovers a learning-rate schedule that decays over
training, close to the hand-tuned one, and beats a random search at the same compute.

The language pair is synthetic, generated here from a fixed data seed (no download). Source
sentences follow a small grammar, ``[det] adj{0,2} noun verb [det] adj{0,2} noun [adv]``, their
words named by kind; the target language has invented words, one per source word (a fixed
bijection), and another word order: the adverb first, each noun phrase reversed, the verb last::

    det0 adj9 noun10 verb22 adj0 adj1 noun0 adv7  ->  zoni fizo zode tuta taba gibe luna peku
    (the red dog sees big old cats quickly        ->  quickly dog red the cats old big sees)

So the model must learn the words *and* where each one goes (attention). Words are drawn by
Zipf's law, so rare ones take long to learn, and the training set is small (2,000 pairs), so
dropout matters. In the training translations 30% of the words are replaced by a "false friend"
(the translation of another word of the same kind); the references BLEU is measured against
are clean. The right word is always the most frequent, but a high learning rate follows the
last few examples it saw: it learns fast, then jitters, and a low one learns slowly. Measured
with all dropouts at 0.1 (24 steps of 25 batches): Adam at a constant 0.02 ended near BLEU 74,
at 0.01 near 72, at 0.005 near 65; 0.02 for half the run, then decayed tenfold, reached 83.
A decaying learning rate is what PBT has to find.

What it found (default size, seeds 0-3; about 3 minutes each on 2 cores): every PBT run kept
the learning rate near 0.01-0.02 for a while, then cut it, ending 6-20x lower; the cut came
between step 9 and step 19 of 24 (truncation judges on the spot, and a member that stops
jittering looks best at once, so the cut tends to come early). Best BLEU: PBT 73.1, 80.4,
74.8, 83.8 (mean 78.0); random search at the same compute 76.5, 78.2, 79.2, 73.6 (mean 76.9).
Mean BLEU of all 8 final members: PBT 75.2, random search 55.4 (whose best member is often
one that happened to jitter up at the last step).

Run it:
    python examples/translation.py [--smoke] [--baseline random] [--seed N] [--workers N]
                                   [--storage sqlite:///runs.db]
    poptune run examples/translation.py --workers 2

It prints the best member's BLEU and the learning-rate schedule along its ancestry.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import sacrebleu
import torch
from torch import nn

import poptune as pt
from poptune.torch import TorchTrainable

# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One size of the experiment: population, budget, data and model."""

    population_size: int = 8
    """Members trained side by side."""
    steps: int = 24
    """Steps each member trains for; a step is `batches_per_step` batches, then a BLEU score."""
    interval: int = 2
    """Steps between a member's ready points (where it may exploit and explore)."""
    burn_in: int = 4
    """No member is judged before this step: until then BLEU is a few points, mostly noise."""
    batches_per_step: int = 25
    """Training batches per step."""
    batch_size: int = 64
    """Sentence pairs per batch."""
    train_pairs: int = 2000
    """Sentence pairs in the training set (small, so that dropout matters)."""
    test_pairs: int = 300
    """Held-out sentence pairs BLEU is measured on (none of them in the training set)."""
    noise: float = 0.3
    """Chance that a word of a training translation is its *false friend* instead (the
    translation of another word of the same kind), as in a sloppy corpus; the held-out
    references are clean. Right is always more frequent than wrong, but telling them apart
    takes averaging over many examples: a high learning rate follows the last few and jitters."""
    data_seed: int = 1234
    """Seed of the language pair and the corpus: the same for every member and every run."""
    d_model: int = 32
    """Width of the Transformer."""
    heads: int = 4
    """Attention heads."""
    layers: int = 2
    """Encoder layers, and as many decoder layers."""
    d_ff: int = 64
    """Width of the feed-forward (ReLU) layer."""


SIZES = {
    "default": Config(),
    "smoke": Config(population_size=4, steps=6, burn_in=2, batches_per_step=10, test_pairs=64),
}


# -- data: a synthetic language pair ---------------------------------------------------------

# Source words are named by their kind ("noun17"), so that the grammar shows in a sentence;
# within a kind, word i is drawn with probability proportional to 1 / (i + 1) (Zipf's law), so
# rare words are seen a few times only and keep BLEU climbing long after the frequent ones.
KINDS = {"det": 4, "adj": 24, "noun": 48, "verb": 24, "adv": 8}
SOURCE_WORDS = [f"{kind}{i}" for kind, count in KINDS.items() for i in range(count)]
ZIPF = {
    kind: 1 / np.arange(1, n + 1) / np.sum(1 / np.arange(1, n + 1)) for kind, n in KINDS.items()
}
PAD, BOS, EOS = 0, 1, 2  # token ids; words follow
MAX_LEN = 12  # longest sentence (11 words) plus EOS


def target_words(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct invented words of two syllables, drawn with ``rng``."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables, size=2)))
    return sorted(words)


def sentence(rng: np.random.Generator) -> list[str]:
    """A random source sentence: ``[det] adj{0,2} noun verb [det] adj{0,2} noun [adv]``."""

    def word(kind: str) -> str:
        return f"{kind}{rng.choice(KINDS[kind], p=ZIPF[kind])}"

    def noun_phrase() -> list[str]:
        det = [word("det")] if rng.random() < 0.7 else []
        return det + [word("adj") for _ in range(rng.integers(0, 3))] + [word("noun")]

    adverb = [word("adv")] if rng.random() < 0.5 else []
    return [*noun_phrase(), word("verb"), *noun_phrase(), *adverb]


def reorder(words: list[str]) -> list[str]:
    """The target word order: adverb first, each noun phrase reversed, verb last."""
    verb = next(i for i, w in enumerate(words) if w.startswith("verb"))
    subject, obj = words[:verb], [w for w in words[verb + 1 :] if not w.startswith("adv")]
    adverb = [w for w in words if w.startswith("adv")]
    return adverb + subject[::-1] + obj[::-1] + [words[verb]]


@dataclass(frozen=True)
class Corpus:
    """The language pair and its sentences, as padded token-id tensors (``EOS``-terminated)."""

    target_vocab: list[str]
    """Target words; word ``target_vocab[i - 3]`` is token ``i``."""
    train_src: torch.Tensor
    train_tgt: torch.Tensor
    test_src: torch.Tensor
    test_refs: list[str]
    """Reference translations of the test sentences, as text."""


_CORPORA: dict[tuple[int, int, int, float], Corpus] = {}


def corpus(config: Config) -> Corpus:
    """The corpus of ``config``: generated once per process, the same everywhere."""
    key = (config.data_seed, config.train_pairs, config.test_pairs, config.noise)
    if key in _CORPORA:
        return _CORPORA[key]
    rng = np.random.default_rng(config.data_seed)
    vocab = target_words(rng, len(SOURCE_WORDS))
    translate = dict(zip(SOURCE_WORDS, rng.permutation(vocab), strict=True))  # the word bijection
    pairs: dict[str, list[str]] = {}  # distinct sentences only: the test set is truly held out
    while len(pairs) < config.train_pairs + config.test_pairs:
        words = sentence(rng)
        pairs[" ".join(words)] = [translate[w] for w in reorder(words)]
    source_id = {w: i + 3 for i, w in enumerate(SOURCE_WORDS)}
    target_id = {w: i + 3 for i, w in enumerate(vocab)}

    def tensor(sentences: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(sentences), MAX_LEN), PAD, dtype=torch.long)
        for i, ids in enumerate(sentences):
            out[i, : len(ids) + 1] = torch.tensor([*ids, EOS])
        return out

    sources = list(pairs)
    src = tensor([[source_id[w] for w in s.split()] for s in sources])
    tgt = tensor([[target_id[w] for w in pairs[s]] for s in sources])
    # The noise: each word's "false friend" is the translation of another word of its kind.
    friend = torch.arange(len(vocab) + 3)
    for kind, count in KINDS.items():
        order = [f"{kind}{i}" for i in rng.permutation(count)]
        for a, b in zip(order, order[1:] + order[:1], strict=True):
            friend[target_id[translate[a]]] = target_id[translate[b]]
    n = config.train_pairs
    noisy = torch.from_numpy(rng.random((n, MAX_LEN)) < config.noise)
    train_tgt = torch.where(noisy, friend[tgt[:n]], tgt[:n])
    _CORPORA[key] = Corpus(
        target_vocab=vocab,
        train_src=src[:n],
        train_tgt=train_tgt,
        test_src=src[n:],
        test_refs=[" ".join(pairs[s]) for s in sources[n:]],
    )
    return _CORPORA[key]


# -- model: a pre-norm Transformer with three separate dropouts ------------------------------


class Block(nn.Module):
    """A pre-norm Transformer layer: self-attention, cross-attention (decoder), feed-forward.

    Three dropouts, as tuned in the paper: *attention* dropout on the attention weights (the
    ``dropout`` float of each `nn.MultiheadAttention`), *layer* (residual) dropout on each
    sub-layer's output before it is added back, *ReLU* dropout after the feed-forward ReLU.
    """

    def __init__(self, config: Config, cross: bool) -> None:
        super().__init__()
        d = config.d_model
        self.self_norm = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, config.heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(d) if cross else None
        self.cross_attn = (
            nn.MultiheadAttention(d, config.heads, batch_first=True) if cross else None
        )
        self.ff_norm = nn.LayerNorm(d)
        self.ff_in, self.ff_out = nn.Linear(d, config.d_ff), nn.Linear(config.d_ff, d)
        self.relu_dropout = nn.Dropout(0.0)
        self.layer_dropout = nn.Dropout(0.0)

    def forward(
        self,
        x: torch.Tensor,
        pad: torch.Tensor,
        causal: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.self_norm(x)
        h = self.self_attn(h, h, h, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
        x = x + self.layer_dropout(h)
        if self.cross_attn is not None and self.cross_norm is not None:
            h = self.cross_norm(x)
            h = self.cross_attn(h, memory, memory, key_padding_mask=memory_pad, need_weights=False)
            x = x + self.layer_dropout(h[0])
        h = self.ff_out(self.relu_dropout(torch.relu(self.ff_in(self.ff_norm(x)))))
        return x + self.layer_dropout(h)


class Transformer(nn.Module):
    """An encoder-decoder Transformer with learned positions and greedy decoding."""

    def __init__(self, config: Config, source_vocab: int, target_vocab: int) -> None:
        super().__init__()
        d = config.d_model
        self.src_embed, self.tgt_embed = (
            nn.Embedding(source_vocab, d),
            nn.Embedding(target_vocab, d),
        )
        self.position = nn.Embedding(MAX_LEN + 1, d)
        self.encoder = nn.ModuleList(Block(config, cross=False) for _ in range(config.layers))
        self.decoder = nn.ModuleList(Block(config, cross=True) for _ in range(config.layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.embed_dropout = nn.Dropout(0.0)  # the layer dropout, also on the embeddings
        self.out = nn.Linear(d, target_vocab)

    def set_dropout(self, kind: str, p: float) -> None:
        """Sets one of the three dropouts (``"attention"``, ``"layer"``, ``"relu"``) everywhere."""
        for module in self.modules():
            if kind == "attention" and isinstance(module, nn.MultiheadAttention):
                module.dropout = p
            elif kind == "layer" and isinstance(module, Block):
                module.layer_dropout.p = p
            elif kind == "relu" and isinstance(module, Block):
                module.relu_dropout.p = p
        if kind == "layer":
            self.embed_dropout.p = p

    def embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.embed_dropout(
            table(ids) * math.sqrt(table.embedding_dim) + self.position(positions)
        )

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = src == PAD
        x = self.embed(self.src_embed, src)
        for block in self.encoder:
            x = block(x, pad)
        return self.enc_norm(x), pad

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor
    ) -> torch.Tensor:
        n = tgt_in.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tgt_in.device).triu(1)
        x = self.embed(self.tgt_embed, tgt_in)
        for block in self.decoder:
            x = block(x, tgt_in == PAD, causal, memory, memory_pad)
        return self.out(self.dec_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, *self.encode(src))

    @torch.no_grad()
    def greedy(self, src: torch.Tensor) -> torch.Tensor:
        """Greedy translations of ``src``: token ids, ``EOS`` then padding after each one."""
        memory, memory_pad = self.encode(src)
        out = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(MAX_LEN):
            token = self.decode(out, memory, memory_pad)[:, -1].argmax(-1)
            token = token.masked_fill(done, PAD)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == EOS
            if done.all():
                break
        return out[:, 1:]


# -- the member ------------------------------------------------------------------------------


class Translator(TorchTrainable):
    """One member: a Transformer trained with Adam, scored by BLEU on the held-out sentences."""

    config: ClassVar[Config] = SIZES["default"]

    hparam_targets: ClassVar[dict[str, Any]] = {
        "lr": "optimizer.lr",
        "attention_dropout": lambda self, p: self.model.set_dropout("attention", p),
        "layer_dropout": lambda self, p: self.model.set_dropout("layer", p),
        "relu_dropout": lambda self, p: self.model.set_dropout("relu", p),
    }

    def setup(self) -> None:
        self.data = corpus(self.config)
        vocab = len(self.data.target_vocab) + 3
        self.model = Transformer(self.config, len(SOURCE_WORDS) + 3, vocab).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.hparams["lr"], betas=(0.9, 0.98)
        )

    def step(self) -> dict[str, float]:
        self.model.train()
        src_all, tgt_all = self.data.train_src, self.data.train_tgt
        losses = []
        for _ in range(self.config.batches_per_step):
            idx = torch.randint(len(src_all), (self.config.batch_size,))
            src, tgt = src_all[idx].to(self.device), tgt_all[idx].to(self.device)
            tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
            logits = self.model(src, tgt_in)
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            losses.append(loss.item())
        return {"bleu": self.bleu(), "loss": float(np.mean(losses))}

    def bleu(self) -> float:
        """Corpus BLEU of greedy translations of the test set."""
        self.model.eval()
        translations = self.model.greedy(self.data.test_src.to(self.device)).tolist()
        hyps = [self.text(ids) for ids in translations]
        return float(sacrebleu.corpus_bleu(hyps, [self.data.test_refs]).score)

    def text(self, ids: list[int]) -> str:
        """The target words of token ids, up to the first ``EOS``."""
        end = ids.index(EOS) if EOS in ids else len(ids)
        return " ".join(self.data.target_vocab[i - 3] for i in ids[:end] if i > EOS)


class SmokeTranslator(Translator):
    """The member of the ``smoke`` size (less training per step, a smaller test set)."""

    config = SIZES["smoke"]


# -- the experiment --------------------------------------------------------------------------

SPACE = {
    "lr": pt.Float(1e-3, 3e-2, log=True),
    # Linear ranges from 0: perturbation shifts them by 20% of the range (see poptune.space).
    "attention_dropout": pt.Float(0.0, 0.3),
    "layer_dropout": pt.Float(0.0, 0.3),
    "relu_dropout": pt.Float(0.0, 0.3),
}


def experiment(seed: int = 0, size: str = "default", baseline: str | None = None) -> pt.Experiment:
    """PBT (``baseline=None``) or random search (``"random"``: same population and steps)."""
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {sorted(SIZES)}, but got {size!r}.")
    if baseline not in (None, "random"):
        raise ValueError(f"`baseline` must be None or 'random', but got {baseline!r}.")
    config = SIZES[size]
    pbt = baseline is None
    return pt.Experiment(
        trainable=Translator if size == "default" else SmokeTranslator,
        space=SPACE,
        population_size=config.population_size,
        steps=config.steps,
        interval=config.interval,
        burn_in=config.burn_in,
        metric="bleu",
        mode="max",
        exploit=pt.Truncation(0.25) if pbt else None,
        explore=pt.Perturb() if pbt else None,
        seed=seed,
    )


# `poptune run examples/translation.py` picks this one up.
EXPERIMENT = experiment()


def summary(result: pt.Result, interval: int = SIZES["default"].interval) -> dict[str, Any]:
    """The best BLEU and, per hyperparameter, ``[step, value]`` at every ready interval along
    the best member's ancestry (``step`` is the first step trained with ``value``)."""
    schedule = [s for s in result.schedule() if (s.step - 1) % interval == 0]
    return {
        "best": float(result.best.score if result.best.score is not None else math.nan),
        "schedule": {name: [[s.step, s.hparams[name]] for s in schedule] for name in SPACE},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (seconds)")
    parser.add_argument("--baseline", choices=["random"], help="random search instead of PBT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--storage", help="storage URL, e.g. sqlite:///runs.db (default: memory)")
    args = parser.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        # A model this small gains nothing from intra-op threads, and on a busy machine two
        # threads spinning for each other made it several times slower (worker processes get
        # their own share of the cores from poptune).
        torch.set_num_threads(1)
    if args.workers > 1 and args.storage is None:
        parser.error(
            "--workers > 1 needs --storage (worker processes share it), e.g. sqlite:///runs.db"
        )
    size = "smoke" if args.smoke else "default"
    exp = experiment(args.seed, size, args.baseline)
    name = f"translation-{size}-{args.baseline or 'pbt'}-{args.seed}"
    if args.storage is None:
        result = exp.run()  # in memory, in this process
    else:
        result = exp.run(args.storage, name, workers=args.workers)
    out = summary(result, SIZES[size].interval)
    best = result.best
    method = "random search" if args.baseline else "PBT"
    print(f"{method}, {size}, seed {args.seed}: best member {best.id}, BLEU {out['best']:.2f}")
    print("hyperparameters along its ancestry (from step: value):")
    for name, values in out["schedule"].items():
        fmt = "{:.2e}" if name == "lr" else "{:.2f}"
        print(f"  {name:<18}" + " ".join(f"{s}:{fmt.format(v)}" for s, v in values))


if __name__ == "__main__":
    main()
