"""The translation example: a smoke-sized PBT run, its baseline, its data, sticky dropouts."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import poptune as pt

torch = pytest.importorskip("torch", reason="the [torch] extra is not installed")
pytest.importorskip("sacrebleu", reason="the [examples] extra is not installed")

PATH = Path(__file__).resolve().parent.parent / "examples" / "translation.py"


def load() -> ModuleType:
    """Imports ``examples/translation.py`` by path (examples are scripts, not a package)."""
    name = "poptune_example_translation"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses need the module registered
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """As ``main()`` does: one intra-op thread is fastest for a model this small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tr() -> ModuleType:
    return load()


@pytest.fixture(scope="module")
def smoke(tr: ModuleType) -> pt.Result:
    return tr.experiment(seed=0, size="smoke").run()


def test_module_defines_the_experiment(tr: ModuleType) -> None:
    """`poptune run examples/translation.py` finds a PBT experiment scored by BLEU."""
    assert isinstance(tr.EXPERIMENT, pt.Experiment)
    assert tr.EXPERIMENT.metric == "bleu" and tr.EXPERIMENT.mode == "max"
    assert isinstance(tr.EXPERIMENT.exploit, pt.Truncation)
    assert tr.EXPERIMENT.exploit.fraction == 0.25
    assert isinstance(tr.EXPERIMENT.explore, pt.Perturb)
    assert set(tr.EXPERIMENT.space) == {"lr", "attention_dropout", "layer_dropout", "relu_dropout"}


@pytest.mark.parametrize("size", ["default", "smoke"])
def test_random_search_baseline_has_the_same_budget(tr: ModuleType, size: str) -> None:
    """Random search: no exploit, no explore, the same population, steps and interval."""
    pbt = tr.experiment(seed=3, size=size)
    rs = tr.experiment(seed=3, size=size, baseline="random")
    assert rs.exploit is None and rs.explore is None
    assert (rs.population_size, rs.steps, rs.interval) == (
        pbt.population_size,
        pbt.steps,
        pbt.interval,
    )
    assert rs.describe()["initial_population"] == pbt.describe()["initial_population"]


def test_bad_size_or_baseline_is_refused(tr: ModuleType) -> None:
    with pytest.raises(ValueError, match="size"):
        tr.experiment(size="huge")
    with pytest.raises(ValueError, match="baseline"):
        tr.experiment(baseline="grid")


def test_corpus_is_fixed_and_its_test_set_held_out(tr: ModuleType) -> None:
    """The language pair comes from the data seed alone; no test sentence is in training."""
    config = tr.SIZES["smoke"]
    data = tr.corpus(config)
    train = {tuple(row.tolist()) for row in data.train_src}
    assert not train & {tuple(row.tolist()) for row in data.test_src}
    assert len(data.test_refs) == config.test_pairs
    tr._CORPORA.clear()
    again = tr.corpus(config)
    assert torch.equal(again.train_tgt, data.train_tgt) and again.test_refs == data.test_refs


def test_reorder_moves_adverb_first_reverses_phrases_and_puts_the_verb_last(
    tr: ModuleType,
) -> None:
    words = ["det0", "adj3", "noun1", "verb2", "adj0", "adj5", "noun7", "adv4"]
    assert tr.reorder(words) == ["adv4", "noun1", "adj3", "det0", "noun7", "adj5", "adj0", "verb2"]
    assert tr.reorder(["noun0", "verb0", "noun1"]) == ["noun0", "noun1", "verb0"]


def test_smoke_run_completes_with_a_finite_bleu(tr: ModuleType, smoke: pt.Result) -> None:
    config = tr.SIZES["smoke"]
    assert len(smoke.history) == config.population_size * config.steps
    assert all(math.isfinite(r.score) and 0.0 <= r.score <= 100.0 for r in smoke.history)
    out = tr.summary(smoke, config.interval)
    assert out["best"] == smoke.best.score
    assert 0.0 <= out["best"] <= 100.0
    lr = out["schedule"]["lr"]
    assert [s for s, _ in lr] == list(range(1, config.steps + 1, config.interval))
    assert set(out["schedule"]) == set(tr.SPACE)


def test_smoke_pbt_exploits(smoke: pt.Result) -> None:
    """Truncation at 25% of 4 members: the last member copies the first at ready points."""
    exploits = [e for e in smoke.events if e.kind == "exploit"]
    assert exploits and all(e.donor != e.member for e in exploits)


def test_hyperparameters_stick_after_loading_another_member(tr: ModuleType) -> None:
    """After a load, the new lr and the three dropouts are in force on every live object,
    not the donor's (whose optimizer state carries its own lr)."""
    donor_hp = {"lr": 5e-3, "attention_dropout": 0.05, "layer_dropout": 0.1, "relu_dropout": 0.2}
    new_hp = {"lr": 2e-4, "attention_dropout": 0.25, "layer_dropout": 0.15, "relu_dropout": 0.01}
    donor = tr.SmokeTranslator(donor_hp, seed=1, device="cpu")
    member = tr.SmokeTranslator({**donor_hp, "lr": 1e-3}, seed=2, device="cpu")
    donor.step()
    member.step()
    member.load_state_dict(donor.state_dict())
    member.set_hparams(new_hp)

    assert [g["lr"] for g in member.optimizer.param_groups] == [new_hp["lr"]]
    attention = [m for m in member.model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    blocks = [m for m in member.model.modules() if isinstance(m, tr.Block)]
    assert len(attention) == 3 * tr.SIZES["smoke"].layers  # encoder self, decoder self + cross
    assert all(m.dropout == new_hp["attention_dropout"] for m in attention)
    assert all(b.layer_dropout.p == new_hp["layer_dropout"] for b in blocks)
    assert member.model.embed_dropout.p == new_hp["layer_dropout"]
    assert all(b.relu_dropout.p == new_hp["relu_dropout"] for b in blocks)
    # Every dropout module is one of the two kinds, so none is left at another value.
    dropouts = [m for m in member.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert {m.p for m in dropouts} == {new_hp["layer_dropout"], new_hp["relu_dropout"]}
    # The copied weights are the donor's, and training on goes with the new values.
    for a, b in zip(member.model.parameters(), donor.model.parameters(), strict=True):
        assert torch.equal(a, b)
    member.step()
    assert member.optimizer.param_groups[0]["lr"] == new_hp["lr"]
