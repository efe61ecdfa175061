"""Span decoding: B/I grouping, word aggregation, whitespace trimming, and the offset contract on any Unicode."""

from __future__ import annotations

import random
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nerbatch.errors import OptionError
from nerbatch.spans import Span, decode_spans, split_tag

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
L = {name: i for i, name in enumerate(LABELS)}


def decode(text, tokens, tags, scores=None, aggregation="simple", word_ids=None, probs=None):
    offsets, pos = [], 0
    for t in tokens:
        start = text.index(t, pos)
        offsets.append((start, start + len(t)))
        pos = start + len(t)
    scores = scores or [0.9] * len(tokens)
    word_ids = word_ids if word_ids is not None else list(range(len(tokens)))
    return decode_spans(text, offsets, word_ids, [L[t] for t in tags], scores, LABELS, aggregation, probs)


def test_split_tag():
    assert split_tag("B-PER") == ("B", "PER")
    assert split_tag("I-LOC") == ("I", "LOC")
    assert split_tag("O") == ("I", "O")
    assert split_tag("PER") == ("I", "PER")


def test_simple_groups_b_then_i_and_splits_on_b():
    text = "John Smith met Mary Jones"
    tags = ["B-PER", "I-PER", "O", "B-PER", "B-PER"]
    spans = decode(text, text.split(), tags, scores=[0.8, 0.6, 0.9, 0.5, 0.7])
    assert [(s.text, s.label) for s in spans] == [("John Smith", "PER"), ("Mary", "PER"), ("Jones", "PER")]
    assert spans[0].score == pytest.approx(0.7)
    assert spans[0] == Span(0, 10, "PER", "John Smith", spans[0].score)


def test_simple_starts_an_entity_on_a_dangling_i():
    text = "in New York now"
    spans = decode(text, text.split(), ["O", "I-LOC", "I-LOC", "O"])
    assert [(s.start, s.end, s.label) for s in spans] == [(3, 11, "LOC")]


def test_first_takes_the_first_subword_of_each_word():
    text = "Volkswagen rose"
    tokens = ["Volks", "wagen", "rose"]
    spans = decode(text, tokens, ["B-ORG", "O", "O"], word_ids=[0, 0, 1], aggregation="first")
    assert [(s.text, s.label) for s in spans] == [("Volkswagen", "ORG")]
    # simple would cut the word in half
    assert [s.text for s in decode(text, tokens, ["B-ORG", "O", "O"], word_ids=[0, 0, 1])] == ["Volks"]


def test_max_takes_the_most_confident_subword():
    text = "Volkswagen rose"
    spans = decode(
        text,
        ["Volks", "wagen", "rose"],
        ["O", "B-ORG", "O"],
        scores=[0.5, 0.9, 0.9],
        word_ids=[0, 0, 1],
        aggregation="max",
    )
    assert [(s.text, s.label, s.score) for s in spans] == [("Volkswagen", "ORG", 0.9)]


def test_average_takes_the_argmax_of_mean_probabilities():
    text = "Volkswagen rose"
    probs = [[0.4, 0, 0, 0.6, 0, 0, 0, 0, 0], [0.7, 0, 0, 0.3, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0]]
    spans = decode(
        text, ["Volks", "wagen", "rose"], ["B-ORG", "O", "O"], word_ids=[0, 0, 1], aggregation="average", probs=probs
    )
    assert spans == []  # mean O = 0.55 beats mean B-ORG = 0.45
    probs[1] = [0.5, 0, 0, 0.5, 0, 0, 0, 0, 0]
    spans = decode(
        text, ["Volks", "wagen", "rose"], ["B-ORG", "O", "O"], word_ids=[0, 0, 1], aggregation="average", probs=probs
    )
    assert [(s.text, s.label, s.score) for s in spans] == [("Volkswagen", "ORG", pytest.approx(0.55))]


def test_leading_space_in_offsets_is_trimmed():
    # Byte-level BPE tokenizers (RoBERTa) report " York" with the space before it.
    text = "in New York"
    offsets = [(0, 2), (2, 6), (6, 11)]
    spans = decode_spans(text, offsets, [0, 1, 2], [0, L["B-LOC"], L["I-LOC"]], [1.0, 1.0, 1.0], LABELS, "first")
    assert [(s.start, s.end, s.text) for s in spans] == [(3, 11, "New York")]


def test_unknown_aggregation_is_an_error():
    with pytest.raises(OptionError, match="aggregation"):
        decode_spans("a", [(0, 1)], [0], [0], [1.0], LABELS, "mean")


# Characters that break naive offset code: astral emoji, ZWJ sequences, CJK, combining marks, \r\n,
# tabs, zero-width spaces/joiners, BOM, non-breaking and ideographic spaces, RTL text.
TRICKY = list("aZ9.,-'\"() \t\r\n") + [
    "\u00e9",
    "e\u0301",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\u00a0",
    "\u3000",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469",
    "東京",
    "中文",
    "한국",
    "\u05e9\u05dc\u05d5\u05dd",
    "ß",
    "ﬁ",
    "\U00010348",
    "İ",
]
tricky_text = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=3)), max_size=40).map("".join)


def byte_level_bpe():
    """A small GPT-2-style tokenizer: byte-level BPE, whose offsets include the space before a word
    and split one character's bytes over several subwords."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    sample = "Peter Blackburn of the European Commission met Zürich's José in 東京 and São Paulo ."
    tok.train_from_iterator([sample] * 20, trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module", params=["cased-wordpiece", "uncased-wordpiece", "byte-level-bpe"])
def tokenizer(request):
    """The three ways tokenizers report offsets: the tiny cased BERT's WordPiece, MiniLM's uncased one
    (lowercases and strips accents: a combining mark is in no subword), and byte-level BPE."""
    from nerbatch.modeling import load_tokenizer

    if request.param == "byte-level-bpe":
        return byte_level_bpe()
    directory = request.getfixturevalue("tiny_model_dir" if request.param == "cased-wordpiece" else "minilm_dir")
    tok = load_tokenizer(str(directory)).backend_tokenizer
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128
    tok.no_truncation()
    return tok


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=tricky_text, seed=st.integers(0, 2**32 - 1), aggregation=st.sampled_from(["first", "simple", "average", "max"])
)
@pytest.mark.slow
def test_offsets_round_trip_on_generated_unicode(tokenizer, text, seed, aggregation):
    enc = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    n = len(enc.ids)
    probs = [[rng.random() for _ in LABELS] for _ in range(n)]
    probs = [[p / sum(row) for p in row] for row in probs]
    best = [max(range(len(LABELS)), key=row.__getitem__) for row in probs]
    spans = decode_spans(
        text, enc.offsets, enc.word_ids, best, [probs[i][b] for i, b in enumerate(best)], LABELS, aggregation, probs
    )
    word_starts = {enc.offsets[i][0] for i in range(n) if i == 0 or enc.word_ids[i] != enc.word_ids[i - 1]}
    word_ends = {enc.offsets[i][1] for i in range(n) if i == n - 1 or enc.word_ids[i] != enc.word_ids[i + 1]}
    previous_end = 0
    for span in spans:
        assert text[span.start : span.end] == span.text
        assert 0 <= previous_end <= span.start < span.end <= len(text)
        assert span.text == span.text.strip()
        assert span.label in {"PER", "ORG", "LOC", "MISC"}
        assert 0.0 <= span.score <= 1.0
        if aggregation != "simple":
            assert on_word_boundaries(span, text, word_starts, word_ends)
        previous_end = span.end


def on_word_boundaries(span, text, word_starts, word_ends) -> bool:
    """Whether a span starts where a word starts and ends where a word ends, give or take the
    whitespace trimmed off its ends and combining marks: those after its last letter are its own,
    those at its start may have gone to the previous span's last letter."""

    def marks(a: int, b: int) -> bool:
        return all(unicodedata.combining(c) for c in text[a:b])

    def marks_then_space(a: int, b: int) -> bool:
        while a < b and unicodedata.combining(text[a]):
            a += 1
        return a == b or text[a:b].isspace()

    starts = any(s <= span.start and marks_then_space(s, span.start) for s in word_starts)
    ends = any(e > span.end and text[span.end : e].isspace() for e in word_ends)
    return starts and (ends or marks(max((e for e in word_ends if e <= span.end), default=span.end), span.end))


def dense_reference(text, offsets, word_ids, best, best_score, aggregation, probs, labels=LABELS):
    """The decoding rule written the slow, obvious way: every unit in order, `O` ones included (an
    `O` unit closes the open entity). `decode_spans` visits only entity subwords; both must agree."""
    units, i, n = [], 0, len(best)
    while i < n:
        j = i + 1
        if aggregation != "simple" and word_ids[i] is not None:
            while j < n and word_ids[j] == word_ids[i]:
                j += 1
        if aggregation in ("simple", "first"):
            label, score = best[i], best_score[i]
        elif aggregation == "max":
            k = max(range(i, j), key=lambda m: best_score[m])
            label, score = best[k], best_score[k]
        else:
            mean = [sum(probs[k][c] for k in range(i, j)) / (j - i) for c in range(len(labels))]
            label = max(range(len(labels)), key=lambda c: mean[c])
            score = mean[label]
        units.append((offsets[i][0], offsets[j - 1][1], *split_tag(labels[label]), score))
        i = j
    spans, group = [], None
    for start, end, bi, tag, score in [*units, (0, 0, "B", "O", 0.0)]:  # a sentinel closes the last group
        if group and tag == group[0] and bi != "B":
            group[2] = max(group[2], end)
            group[3].append(score)
            continue
        if group and group[0] != "O":
            a, b = group[1], group[2]
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if a < b:
                spans.append(Span(a, b, group[0], text[a:b], sum(group[3]) / len(group[3])))
        group = [tag, start, max(start, end), [score]]
    return spans


# BIO plus the other schemes' prefixes (S/E, U/L) and a bare type, which `split_tag` also reads
MIXED_LABELS = [*LABELS, "S-PER", "E-PER", "U-LOC", "L-LOC", "MISC"]


@settings(max_examples=400, deadline=None)
@given(
    words=st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["own", "none", "repeat"])), max_size=30),
    seed=st.integers(0, 2**32 - 1),
    outside_share=st.sampled_from([0.0, 0.5, 0.9]),
    aggregation=st.sampled_from(["first", "simple", "average", "max"]),
    labels=st.sampled_from([LABELS, MIXED_LABELS]),
)
def test_visiting_only_entity_subwords_decodes_like_visiting_every_unit(
    words, seed, outside_share, aggregation, labels
):
    # words: (subwords, word id: its own / none / that of the word two back); "ab" per subword
    rng = random.Random(seed)
    text, offsets, word_ids = "", [], []
    for w, (count, kind) in enumerate(words):
        word = {"own": w, "none": None, "repeat": max(w - 2, 0)}[kind]
        for _ in range(count):
            offsets.append((len(text), len(text) + 2))
            word_ids.append(word)
            text += "ab"
        text += " "
    probs = []
    for _ in offsets:
        row = [rng.random() for _ in labels]
        row[0] += 3 * outside_share * rng.random() * 2  # many O subwords, as in real text
        probs.append([p / sum(row) for p in row])
    best = [max(range(len(labels)), key=row.__getitem__) for row in probs]
    scores = [probs[i][b] for i, b in enumerate(best)]
    expected = dense_reference(text, offsets, word_ids, best, scores, aggregation, probs, labels)
    assert decode_spans(text, offsets, word_ids, best, scores, labels, aggregation, probs) == expected


def test_combining_marks_after_an_entity_belong_to_it():
    """Decomposed text (NFD): an accent-stripping normalizer gives the U+0301 after `Jose` no
    subword, so the offsets end before it; the span keeps it (and never starts on one)."""
    text = "Jose\u0301 met Smith\u0301\u0308 ."
    offsets = [(0, 4), (6, 9), (10, 15), (18, 19)]  # what BERT's uncased tokenizer reports
    tags = [L["B-PER"], L["O"], L["B-PER"], L["O"]]
    spans = decode_spans(text, offsets, [0, 1, 2, 3], tags, [0.9] * 4, LABELS, "first")
    assert [(s.start, s.end, s.text) for s in spans] == [(0, 5, "Jose\u0301"), (10, 17, "Smith\u0301\u0308")]


@pytest.mark.parametrize("tags", [["O", "B-MISC", "O"], ["O", "B-MISC", "B-PER"], ["O", "B-MISC", "I-MISC"]])
def test_a_combining_mark_stays_with_the_letter_before_it(tags):
    """A cased tokenizer puts the U+0300 after `.` in the next word (`\u03000`, as CI's property test
    drew); byte-level BPE makes a lone mark a word of its own. The mark stays with the letter it
    modifies: the `.` span takes it, and a span of the next word starts after it."""
    text = "aaaaaaa.\u03000"
    spans = decode_spans(text, [(0, 7), (7, 8), (8, 10)], [0, 1, 2], [L[t] for t in tags], [0.9] * 3, LABELS, "first")
    expected = {
        "O": [(7, 9, "MISC")],
        "B-PER": [(7, 9, "MISC"), (9, 10, "PER")],
        "I-MISC": [(7, 10, "MISC")],
    }[tags[2]]
    assert [(s.start, s.end, s.label) for s in spans] == expected


def test_a_lone_combining_mark_word_stays_with_its_letter():
    """Byte-level BPE on decomposed text: `Jose` and U+0301 are two words; the second tagged `O`
    must not split the accent from its letter (a reviewer found `Jose`, `Zu`)."""
    text = "Jose\u0301 met Zu\u0308rich"
    offsets = [(0, 4), (4, 5), (6, 9), (10, 12), (12, 13), (13, 17)]
    tags = ["B-PER", "O", "O", "B-LOC", "O", "B-LOC"]
    spans = decode_spans(text, offsets, list(range(6)), [L[t] for t in tags], [0.9] * 6, LABELS, "first")
    assert [s.text for s in spans] == ["Jose\u0301", "Zu\u0308", "rich"]


def test_subwords_that_share_a_character_never_give_overlapping_spans():
    """MiniLM's uncased tokenizer splits each Hangul syllable into three jamo subwords, all with the
    syllable's offsets; under `simple` they can disagree. A character goes to the first span that
    takes it (found by the property test with that tokenizer)."""
    offsets = [(0, 1)] * 3 + [(1, 2)] * 3
    tags = ["B-ORG", "B-PER", "O", "B-PER", "I-PER", "I-PER"]
    spans = decode_spans("한국", offsets, [0] * 6, [L[t] for t in tags], [0.9] * 6, LABELS, "simple")
    assert [(s.start, s.end, s.text, s.label) for s in spans] == [(0, 1, "한", "ORG"), (1, 2, "국", "PER")]
