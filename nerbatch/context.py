"""Document-context training features: consecutive sentences of one document packed into windows.

`annotate` shows a document-context model running text cut into windows of the length it was
trained on, and such a model must also tag a lone sentence (a short document, a headline). So with
`context = "document"` the training set holds every sentence on its own, as in sentence mode, plus
every sentence once more inside a window of its neighbours (with `lone_share` below 1, an epoch
trains on that share of the lone sentences, drawn anew each epoch, and on every window). Each
document's sentence features are packed in order into windows whose length is drawn uniformly
between `MIN_WINDOW` subwords and the configured window, so the model sees every window size
annotate may use, and a subword sees from no context to a few hundred subwords on either side.
Every subword of a window is labelled, as every subword of an annotate window is predicted. Windows
never cross a document boundary.
"""

from __future__ import annotations

import random

from nerbatch.align import Feature
from nerbatch.data import Sentence

MIN_WINDOW = 64  # shortest drawn window (content subwords): below that, it is the lone-sentence case


def pack_features(
    features: list[Feature], sentences: list[Sentence], prefix: int, suffix: int, window: int, seed: int
) -> list[Feature]:
    """Windows of consecutive same-document features, each at most `window` subwords with specials.

    `features` come from `align.encode` (in sentence order; a long sentence may have several);
    `prefix`/`suffix` are the counts of special tokens around their content. The window lengths are
    drawn from a generator seeded by `seed`, so a run (and its resume) packs identically.
    """
    rng = random.Random(seed)
    budget_max = window - prefix - suffix
    packed: list[Feature] = []
    group: list[Feature] = []
    used, budget = 0, 0
    for feature in features:
        size = len(feature.input_ids) - prefix - suffix
        if size > budget_max:  # a sentence longer than any window: it is in the set on its own already
            if group:
                packed.append(_join(group, prefix, suffix))
                group = []
            continue
        same_document = group and sentences[group[-1].sentence].document == sentences[feature.sentence].document
        if group and (not same_document or used + size > budget):
            packed.append(_join(group, prefix, suffix))
            group = []
        if not group:
            used, budget = 0, rng.randint(min(MIN_WINDOW, budget_max), budget_max)
        group.append(feature)
        used += size
    if group:
        packed.append(_join(group, prefix, suffix))
    return packed


def _join(group: list[Feature], prefix: int, suffix: int) -> Feature:
    """One feature from several: their contents between the first one's special tokens."""
    first, last = group[0], group[-1]
    ids = first.input_ids[:prefix] + [i for f in group for i in f.input_ids[prefix : len(f.input_ids) - suffix]]
    ids += last.input_ids[len(last.input_ids) - suffix :]
    labels = first.labels[:prefix] + [x for f in group for x in f.labels[prefix : len(f.labels) - suffix]]
    labels += last.labels[len(last.labels) - suffix :]
    token_types = None
    if first.token_type_ids is not None:
        token_types = [first.token_type_ids[0]] * len(ids)
    return Feature(ids, labels, first.sentence, first.first_word, sum(f.n_words for f in group), [], token_types)


def document_features(
    features: list[Feature], sentences: list[Sentence], prefix: int, suffix: int, window: int, seed: int
) -> list[Feature]:
    """The document-context training set: every sentence feature alone, then the packed windows."""
    return features + pack_features(features, sentences, prefix, suffix, window, seed)
