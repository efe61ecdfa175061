"""From words and tags to model features: subword tokenization and label alignment.

Sentences that do not fit the model are split at word boundaries into several features (each
remembers its sentence and first word), so no word is ever cut off; the split count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from nerbatch.data import DataError, Sentence

IGNORE = -100  # label id the loss and the metrics skip


@dataclass
class Feature:
    input_ids: list[int]
    labels: list[int]
    sentence: int  # index of the sentence this feature comes from
    first_word: int  # index of its first word within that sentence
    n_words: int
    scored_words: list[int]  # words (relative to first_word) that have a first subword, in order
    token_type_ids: list[int] | None = None

    def to_model_input(self) -> dict:
        """The dict `DataCollatorForTokenClassification` pads into a batch."""
        item = {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids
        return item


@dataclass
class Encoded:
    features: list[Feature]
    split_sentences: int  # sentences too long for max_length, split into several features
    lone: int = 0  # document context: the first `lone` features are sentences on their own (nerbatch.context)


def b_to_i_map(labels: list[str]) -> list[int]:
    """For each label id, the id a continuation subword takes: `B-X` -> `I-X`, others unchanged."""
    index = {name: i for i, name in enumerate(labels)}
    return [index.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(labels)]


def align_labels(
    word_labels: list[int], word_ids: list[int | None], b_to_i: list[int], label_all_subwords: bool = True
) -> list[int]:
    """Give each subword a label id: -100 on special tokens, the word's label on its first subword,
    and on continuation subwords the `I-` form of it (or -100 with `label_all_subwords=False`)."""
    aligned = []
    previous = None
    for word in word_ids:
        if word is None:
            aligned.append(IGNORE)
        elif word != previous:
            aligned.append(word_labels[word])
        else:
            aligned.append(b_to_i[word_labels[word]] if label_all_subwords else IGNORE)
        previous = word
    return aligned


def encode(
    tokenizer, sentences: list[Sentence], label2id: dict[str, int], max_length: int, label_all_subwords: bool = True
) -> Encoded:
    """Tokenize sentences (batched, `is_split_into_words=True`) and align their labels.

    A sentence longer than `max_length` subwords becomes several features split between words.
    """
    labels = sorted(label2id, key=label2id.get)
    b_to_i = b_to_i_map(labels)
    chunks = []  # (sentence index, first word, words, label ids)
    split = 0
    lengths = _subword_counts(tokenizer, [s.words for s in sentences])
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    for i, (sentence, counts) in enumerate(zip(sentences, lengths)):
        ids = [label2id[t] for t in sentence.tags]
        spans = _split_by_budget(counts, budget, sentence)
        split += len(spans) > 1
        chunks += [(i, a, sentence.words[a:b], ids[a:b]) for a, b in spans]
    enc = tokenizer([c[2] for c in chunks], is_split_into_words=True, truncation=False, verbose=False)
    features = []
    for k, (i, first, words, ids) in enumerate(chunks):
        word_ids = enc.word_ids(k)
        aligned = align_labels(ids, word_ids, b_to_i, label_all_subwords)
        scored = sorted({w for w in word_ids if w is not None})
        token_types = enc["token_type_ids"][k] if "token_type_ids" in enc else None
        features.append(Feature(enc["input_ids"][k], aligned, i, first, len(words), scored, token_types))
    return Encoded(features, split)


def _subword_counts(tokenizer, word_lists: list[list[str]]) -> list[list[int]]:
    """Number of subwords of every word (0 for words the tokenizer drops, e.g. a lone zero-width space)."""
    enc = tokenizer(word_lists, is_split_into_words=True, truncation=False, add_special_tokens=False, verbose=False)
    counts = []
    for k, words in enumerate(word_lists):
        per_word = [0] * len(words)
        for w in enc.word_ids(k):
            if w is not None:
                per_word[w] += 1
        counts.append(per_word)
    return counts


def _split_by_budget(counts: list[int], budget: int, sentence: Sentence) -> list[tuple[int, int]]:
    """Greedy word ranges [a, b) whose subword totals fit in `budget`."""
    spans, start, used = [], 0, 0
    for w, n in enumerate(counts):
        if n > budget:
            raise DataError(
                f"{sentence.where(w)}: the word {sentence.words[w][:40]!r} alone has {n} subwords, "
                f"more than max length allows ({budget})"
            )
        if used + n > budget:
            spans.append((start, w))
            start, used = w, 0
        used += n
    spans.append((start, len(counts)))
    return spans
