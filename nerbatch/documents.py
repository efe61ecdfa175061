"""Labelled documents for document-level scoring: running text rebuilt from labelled sentences, and
predicted character spans mapped back onto the gold words.

A document's text is its words joined by one space and its sentences by a newline, the way a
plain-text dump of the article would read, or by a space (`join="space"`), the way text extracted
from HTML or PDFs often runs on; every word keeps its character span, so the spans that `annotate`
returns can be scored against the gold word tags with seqeval.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nerbatch.data import Corpus, DataError


@dataclass
class LabelledDocument:
    """Running text and, for each of its sentences, the corpus index and its words' character spans."""

    text: str
    sentences: list[int]  # indices into `Corpus.sentences`, in reading order
    word_spans: list[list[tuple[int, int]]]  # per sentence, per word: [start, end) in `text`

    @property
    def words(self) -> list[tuple[int, int]]:
        """Every word's span, in order, across sentences."""
        return [span for sentence in self.word_spans for span in sentence]


# How sentences are joined into a document's text.
JOINS = {"newline": "\n", "space": " "}


def build_documents(corpus: Corpus, join: str = "newline") -> list[LabelledDocument]:
    """Rebuild the corpus's documents as text, sentences joined as `join` says (`JOINS`); a corpus
    without document boundaries is an error."""
    if not corpus.has_documents:
        raise DataError(corpus.no_documents_reason())
    documents: list[LabelledDocument] = []
    current = None
    for index, sentence in enumerate(corpus.sentences):
        if sentence.document != current or not documents:
            documents.append(LabelledDocument("", [], []))
            current = sentence.document
        _append_sentence(documents[-1], index, sentence.words, JOINS[join])
    return documents


def _append_sentence(document: LabelledDocument, index: int, words: Sequence[str], separator: str) -> None:
    parts, spans = [], []
    position = len(document.text) + (len(separator) if document.text else 0)  # the separator before it
    for word in words:
        spans.append((position, position + len(word)))
        parts.append(word)
        position += len(word) + 1
    document.text += (separator if document.text else "") + " ".join(parts)
    document.sentences.append(index)
    document.word_spans.append(spans)


def spans_to_word_tags(spans: Iterable, words: Sequence[tuple[int, int]]) -> list[str]:
    """IOB2 tags for `words` (sorted, non-overlapping character spans) from predicted entity spans.

    A word takes the label of the first span that overlaps it by at least one character (so an entity
    that starts or ends inside a word still labels that word); the first word a span touches is its
    `B-`, the following ones `I-` (so "U" + "S. Steel", split inside the word "U.S.", stays one
    entity). Words no span touches are `O`; zero-width words are always `O`.
    """
    tags = ["O"] * len(words)
    starts = [start for start, _ in words]
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        opened = False
        k = max(bisect_right(starts, span.start) - 1, 0)  # the last word starting at or before the span
        while k < len(words) and words[k][0] < span.end:
            start, end = words[k]
            if start < end and start < span.end and end > span.start:
                if tags[k] == "O":
                    tags[k] = ("I-" if opened else "B-") + span.label
                opened = True
            k += 1
    return tags


def split_by_sentence(document: LabelledDocument, tags: list[str]) -> list[list[str]]:
    """Cut a document's word tags back into its sentences."""
    out, k = [], 0
    for spans in document.word_spans:
        out.append(tags[k : k + len(spans)])
        k += len(spans)
    return out
