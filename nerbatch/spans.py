"""From subword predictions to entity spans: character offsets, words, aggregation, B/I grouping.

Pure Python (no torch, no numpy required), so the offset contract can be property-tested on any
string: every returned `Span` satisfies `text[span.start:span.end] == span.text`.

Aggregation strategies mean what they mean in the transformers token-classification pipeline:

- `simple`: every subword keeps its own argmax label; adjacent subwords are grouped by the B/I rule.
- `first`: a word takes the label and score of its first subword.
- `max`: a word takes the label and score of its most confident subword.
- `average`: a word takes the argmax of its subwords' mean probability vector.

Words are the tokenizer's own pre-tokenizer words (`word_ids`), so with `first`/`average`/`max`
spans start and end on word boundaries. A group's score is the mean of its members' scores.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from nerbatch.errors import OptionError
from nerbatch.options import AGGREGATIONS


@dataclass(frozen=True, slots=True)
class Span:
    """One entity: character offsets into the original text (end exclusive), type, text, score."""

    start: int
    end: int
    label: str
    text: str
    score: float

    def as_dict(self) -> dict:
        """The row form written to Parquet (`entities` list items)."""
        return {"start": self.start, "end": self.end, "label": self.label, "text": self.text, "score": self.score}


# Prefix letter -> its role in grouping: `B` opens an entity, `I` continues one of the same type.
# IOB1/IOB2 (B, I), IOBES (S = single, E = end) and BILOU (U = unit, L = last) all reduce to these two.
_PREFIX_ROLE = {"B": "B", "I": "I", "S": "B", "E": "I", "U": "B", "L": "I"}


def split_tag(label: str) -> tuple[str, str]:
    """`B-PER` -> (`B`, `PER`); `I-PER` -> (`I`, `PER`); `S-`/`U-` open like `B-`, `E-`/`L-` continue
    like `I-`; a bare `PER` or `O` counts as a continuation `I`."""
    if len(label) > 2 and label[1] == "-" and label[0] in _PREFIX_ROLE:
        return _PREFIX_ROLE[label[0]], label[2:]
    return "I", label


def decode_spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    word_ids: Sequence[int | None],
    best: Sequence[int],
    best_score: Sequence[float],
    labels: Sequence[str],
    aggregation: str = "first",
    probs: Sequence[Sequence[float]] | None = None,
) -> list[Span]:
    """Decode the spans of one document from per-subword predictions.

    `offsets`, `word_ids`, `best` (argmax label id) and `best_score` (its probability) have one entry
    per content subword (no special tokens), in order. `probs` (one probability vector per subword)
    is needed only for `average`.
    """
    if aggregation not in AGGREGATIONS:
        raise OptionError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if aggregation == "average" and probs is None:
        raise ValueError("aggregation 'average' needs the probability vectors (probs)")
    tags = [split_tag(label) for label in labels]  # once per document, not once per subword
    units = _entity_units(word_ids, best, best_score, aggregation, probs, tags)
    return _group_units(text, offsets, units, tags)


def _entity_units(word_ids, best, best_score, aggregation, probs, tags) -> list[tuple[int, int, int, float]]:
    """(first subword, end subword, label id, score) of each unit that is not `O`, in order: a unit
    is a subword (`simple`) or a word, a run of subwords with one word id (a subword without one is
    a word of its own).

    Most subwords of a document are `O`, so only those predicted as an entity are visited, with the
    words around them: a word all of whose subwords are `O` is `O` under `simple`, `first` and `max`.
    Not under `average` (a mean of vectors whose argmax is `O` can tie with another label, and ties go
    to the lower id), so there every word is visited.
    """
    if aggregation == "average":
        visit = range(len(best))
    else:
        outside = {k for k, (_, tag) in enumerate(tags) if tag == "O"}
        visit = [i for i, label in enumerate(best) if label not in outside]
    units = []
    decided = 0  # subwords before this one belong to a word already decided
    for i in visit:
        if i < decided:
            continue
        if aggregation == "simple":
            a, b, label, score = i, i + 1, best[i], best_score[i]
        else:
            a, b = _word_around(word_ids, i)
            label, score = _word_label(a, b, best, best_score, aggregation, probs)
        decided = b
        if tags[label][1] != "O":
            units.append((a, b, label, score))
    return units


def _word_around(word_ids, i: int) -> tuple[int, int]:
    """The subword range [a, b) of the word that subword `i` belongs to."""
    word = word_ids[i]
    a, b = i, i + 1
    if word is not None:
        while a > 0 and word_ids[a - 1] == word:
            a -= 1
        while b < len(word_ids) and word_ids[b] == word:
            b += 1
    return a, b


def _word_label(i: int, j: int, best, best_score, aggregation, probs) -> tuple[int, float]:
    """Label id and score of the word made of subwords [i, j)."""
    if aggregation == "first" or j - i == 1 and aggregation == "max":
        return best[i], best_score[i]
    if aggregation == "max":
        k = max(range(i, j), key=best_score.__getitem__)  # first on ties, like the pipeline
        return best[k], best_score[k]
    width = len(probs[i])
    mean = [sum(probs[k][c] for k in range(i, j)) / (j - i) for c in range(width)]
    label = max(range(width), key=mean.__getitem__)
    return label, mean[label]


def _group_units(text: str, offsets, units, tags) -> list[Span]:
    """Group adjacent entity units of one type into spans (a `B-` opens a new one), trim whitespace.

    Units are adjacent when no unit lies between them: an `O` unit between two entity units, which
    `_entity_units` leaves out, shows as a gap in their subword ranges and separates them."""
    spans = []
    group_tag = None
    group_start = group_end = 0
    after = -1  # the subword just after the open group
    scores: list[float] = []

    def close() -> None:
        if group_tag is not None:
            # a span never starts before the previous one ends: subwords can share a character (an
            # uncased tokenizer splits a Hangul syllable into jamo, byte-level BPE splits a
            # character's bytes) and, under `simple`, disagree on it; and the previous span took the
            # combining marks after its last letter even where the tokenizer put them in this word.
            # Either way the character stays with the span that took it first.
            start = max(group_start, spans[-1].end) if spans else group_start
            span = _trimmed_span(text, start, group_end, group_tag, sum(scores) / len(scores))
            if span is not None:
                spans.append(span)

    for a, b, label_id, score in units:
        bi, tag = tags[label_id]
        start, end = offsets[a][0], offsets[b - 1][1]
        if a == after and tag == group_tag and bi != "B":
            group_end = max(group_end, end)
            scores.append(score)
        else:
            close()
            group_tag, group_start, group_end, scores = tag, start, max(start, end), [score]
        after = b
    close()
    return spans


def _trimmed_span(text: str, start: int, end: int, label: str, score: float) -> Span | None:
    """A span with leading/trailing whitespace removed (byte-level BPE offsets include the space
    before a word) and the combining marks that follow its last character added, so that no letter
    is split from its accent: an accent-stripping normalizer leaves a decomposed `José`'s U+0301 in
    no subword, byte-level BPE makes it a word of its own, a cased WordPiece can put it at the start
    of the next word. None when nothing but whitespace is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start >= end:
        return None
    while end < len(text) and unicodedata.combining(text[end]):
        end += 1
    return Span(start, end, label, text[start:end], float(score))
