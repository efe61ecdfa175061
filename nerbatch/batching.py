"""Batching: length-grouped, seeded batch order and the DataLoaders built on it."""

from __future__ import annotations

import math

import torch

from nerbatch.align import Encoded


class LengthGroupedBatches:
    """Shuffled batches of indices, deterministic for a (seed, epoch) pair.

    With `group=True` indices are shuffled, cut into mega-batches of 50 batches, each sorted by
    length, so a batch holds sentences of similar length and padding nearly vanishes while the
    order stays random. The short remainder batch always comes last, as a plain sampler's would.

    With `sampled` > 0, only `share` of the first `sampled` indices take part in an epoch, drawn
    anew each epoch (the same number every epoch); the other indices always do.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group: bool = True,
        shuffle: bool = True,
        sampled: int = 0,
        share: float = 1.0,
    ):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group, self.shuffle = group, shuffle
        self.sampled, self.drawn = sampled, round(share * sampled)
        self.drop_last = False
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.epoch_size() / self.batch_size)

    def epoch_size(self) -> int:
        """How many indices an epoch uses."""
        return len(self.lengths) - self.sampled + self.drawn

    def _epoch_indices(self, generator: torch.Generator) -> list[int]:
        """The indices of this epoch, in index order: a draw of the sampled ones, then the rest."""
        if self.drawn == self.sampled:
            return list(range(len(self.lengths)))
        drawn = sorted(torch.randperm(self.sampled, generator=generator)[: self.drawn].tolist())
        return drawn + list(range(self.sampled, len(self.lengths)))

    def __iter__(self):
        n, size = self.epoch_size(), self.batch_size
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = self._epoch_indices(generator)
        order = [indices[i] for i in torch.randperm(n, generator=generator).tolist()] if self.shuffle else indices
        if self.group:
            mega = size * 50
            order = [
                i
                for k in range(0, n, mega)
                for i in sorted(order[k : k + mega], key=self.lengths.__getitem__, reverse=True)
            ]
        full = n - n % size
        batches = [order[k : k + size] for k in range(0, full, size)]
        if self.group and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if full < n:
            batches.append(order[full:])
        yield from batches


def make_loader(
    encoded: Encoded, collator, batch_size: int, seed: int, train: bool, group: bool, lone_share: float = 1.0
):
    """A DataLoader over encoded features; eval loaders keep order (sorted by length for speed).
    With document context, `lone_share` of the sentences on their own (`encoded.lone`) are drawn
    for each epoch."""
    items = [f.to_model_input() for f in encoded.features]
    lengths = [len(f.input_ids) for f in encoded.features]
    sampler = LengthGroupedBatches(
        lengths, batch_size, seed, group=group, shuffle=train, sampled=encoded.lone, share=lone_share
    )
    # A private generator: creating a loader iterator draws a seed from it, and drawing from the
    # global RNG instead would shift dropout masks after a resume.
    return torch.utils.data.DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )


def sort_by_length(encoded: Encoded) -> Encoded:
    """Order evaluation features longest first: batches pad less, and the order is still fixed."""
    return Encoded(sorted(encoded.features, key=lambda f: -len(f.input_ids)), encoded.split_sentences)
