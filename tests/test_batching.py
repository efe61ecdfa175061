"""`nerbatch.batching`: seeded length-grouped batches and loaders."""

from __future__ import annotations

from nerbatch.align import Encoded, Feature
from nerbatch.batching import LengthGroupedBatches, make_loader


def test_batches_depend_only_on_seed_and_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, 16, seed=7)
    first = list(sampler)
    assert list(LengthGroupedBatches(lengths, 16, seed=7)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    assert len(first[-1]) == 1000 % 16 and len(first) == len(sampler)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 5  # grouped: a batch holds similar lengths (random batches would spread ~45)


def test_eval_loader_keeps_order():
    features = [Feature(list(range(n)), [0] * n, k, 0, n, list(range(n))) for k, n in enumerate([5, 3, 8])]
    loader = make_loader(Encoded(features, 0), lambda items: items, 2, 0, train=False, group=False)
    assert [[len(x["input_ids"]) for x in batch] for batch in loader] == [[5, 3], [8]]
