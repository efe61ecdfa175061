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


def test_a_share_of_the_lone_sentences_is_drawn_anew_each_epoch():
    """`sampled`/`share`: each epoch uses the same number of the sampled indices (a different draw
    each epoch, the same for a seed and epoch) and every other index once."""
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, 16, seed=7, sampled=600, share=0.5)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        used = sorted(i for batch in batches for i in batch)
        assert len(used) == len(set(used)) == 700 == sampler.epoch_size()
        assert len(batches) == len(sampler) == 44
        assert [i for i in used if i >= 600] == list(range(600, 1000))  # the windows, every epoch
        assert batches == list(sampler)  # the same draw and order on a resume
        epochs.append({i for i in used if i < 600})
    assert len({frozenset(s) for s in epochs}) == 3
    assert len(epochs[0] | epochs[1] | epochs[2]) > 500  # over epochs, most lone sentences are seen
