"""The one negative sampler: training negatives come from outside everything the domain knows of the user, the
stored candidates' draws are uniform, and a run's identity keeps seeds apart."""

from collections import Counter

import numpy as np
import pytest

from xcross.data import CandidateSampler, Domain, Example, TooFewItems, sample_candidates
from xcross.experiment import source_config
from xcross.rundir import RunDir
from xcross.settings import differences
from xcross.settings import RunConfig


def _domain(n_items=12) -> Domain:
    items = {f"i{k}": f"title {k}" for k in range(n_items)}
    # user a bought i0..i4 in order: training rows know i0..i2, validation adds i3, test adds i4.
    train = [Example("a", ["i0"], "i1"), Example("a", ["i0", "i1"], "i2"), Example("b", ["i5"], "i6")]
    valid = [Example("a", ["i1", "i2"], "i3", ["i3", "i7"]), Example("b", ["i5"], "i6", ["i6", "i8"])]
    test = [Example("a", ["i2", "i3"], "i4", ["i4", "i9"]), Example("b", ["i6"], "i7", ["i7", "i8"])]
    return Domain("d", items, train, valid, test)


def test_training_negatives_never_include_any_item_of_the_users_sequence():
    domain = _domain()
    sampler = CandidateSampler(domain)
    sequence = {"a": {"i0", "i1", "i2", "i3", "i4"}, "b": {"i5", "i6", "i7"}}  # written out by hand
    drawn = Counter()
    for seed in range(300):
        for example in domain.train:
            cands, label = sampler.sample(example, 5, np.random.default_rng(seed))
            assert cands[label] == example.target and len(set(cands)) == 5
            negatives = set(cands) - {example.target}
            assert not negatives & sequence[example.user_id], (example, cands)
            drawn.update(negatives if example.user_id == "a" else ())
    # every item outside a's sequence is drawn, and about equally often (uniform): 7 items, 4 of them a draw
    assert set(drawn) == {f"i{k}" for k in range(5, 12)}
    expected = 2 * 300 * 4 / 7
    assert all(abs(c - expected) < 0.2 * expected for c in drawn.values()), drawn


def test_too_few_items_outside_the_sequence_is_refused():
    with pytest.raises(TooFewItems, match="leaving 2 negatives for 3 needed"):
        sample_candidates(np.random.default_rng(0), 5, np.array([0, 1, 2]), 0, 4)


def test_the_seed_is_part_of_a_runs_identity(tmp_path):
    seed0 = RunConfig(out=str(tmp_path), target="tools", method="xcross")
    seed1 = seed0.with_values({"train.seed": 1})
    assert RunDir.of(seed0).path != RunDir.of(seed1).path  # two seeds never share a directory
    assert RunDir.of(seed1).name == "xcross-s1" and RunDir.of(seed0.with_values({"fraction": 0.25})).name == \
        "xcross-f0.25"
    # a source adapter of another seed is not the one this run asks for
    source0, source1 = source_config(seed0, "toys"), source_config(seed1, "toys")
    assert differences(source0, source1) == ["train.seed: 0 there, 1 here"]
    # what a LoRA source does not read is no part of it
    assert differences(source0, source_config(seed0.with_values({"train.integrator_lr": 1e-3}), "toys")) == []
