"""Document level: rebuilding documents, mapping spans to words, segmentation, context features,
`evaluate --documents` on 1 and 2 processes, and training that records how annotate should run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from nerbatch.cli import main
from nerbatch.context import pack_features
from nerbatch.data import Corpus, DataError, Sentence, load_corpus, read_conll
from nerbatch.documents import build_documents, spans_to_word_tags, split_by_sentence
from nerbatch.segment import cap_segments, cut_strength, is_hard_wrapped, sentence_bounds
from nerbatch.spans import Span

from conftest import CONLL, need
from helpers import last_json, run, write_conll


def sentence(words: str, tags: str, document: int | None) -> Sentence:
    return Sentence(words.split(), tags.split(), "mem", row=0, document=document)


def span(start: int, end: int, label: str) -> Span:
    return Span(start, end, label, "", 1.0)


def test_documents_are_rebuilt_as_text_with_word_spans():
    corpus = Corpus(
        [
            sentence("EU rejects German call", "B-ORG O B-MISC O", 0),
            sentence("Peter Blackburn", "B-PER I-PER", 0),
            sentence("BRUSSELS 1996", "B-LOC O", 1),
        ],
        has_documents=True,
    )
    first, second = build_documents(corpus)
    assert first.text == "EU rejects German call\nPeter Blackburn" and second.text == "BRUSSELS 1996"
    assert first.sentences == [0, 1] and second.sentences == [2]
    assert [first.text[a:b] for a, b in first.words] == ["EU", "rejects", "German", "call", "Peter", "Blackburn"]
    tags = ["B-ORG", "O", "B-MISC", "O", "B-PER", "I-PER"]
    assert split_by_sentence(first, tags) == [tags[:4], tags[4:]]


@pytest.mark.slow
def test_space_joined_documents_keep_every_gold_words_offsets():
    """The space join (text with no line breaks) changes only the separators: the same words, each at
    a span holding exactly that word, so the same gold spans are scored."""
    corpus = read_conll(need(CONLL / "valid.txt"))
    newline, space = build_documents(corpus), build_documents(corpus, "space")
    assert len(newline) == len(space) > 200
    for a, b in zip(newline, space):
        assert "\n" not in b.text and b.text == a.text.replace("\n", " ") and b.sentences == a.sentences
        assert [b.text[s:e] for s, e in b.words] == [a.text[s:e] for s, e in a.words]
        assert b.words == a.words  # one character either way: offsets do not move
    words = [w for d in space for i in d.sentences for w in corpus.sentences[i].words]
    assert words == [w for s in corpus.sentences for w in s.words]  # every word, once, in order


def test_a_corpus_without_documents_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    path = tmp_path / "plain.conll"
    path.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\n")
    with pytest.raises(DataError, match="-DOCSTART-"):
        build_documents(read_conll(path))
    result = CliRunner().invoke(main, ["evaluate", str(tiny_model_dir), str(path), "--documents"])
    assert result.exit_code == 1 and "no -DOCSTART- line" in result.output
    assert len(result.output.strip().splitlines()) == 1
    hub = Corpus([], name="conll2003[validation]")
    assert "drops the -DOCSTART- lines" in hub.no_documents_reason()


def test_spans_map_to_gold_words():
    text = "U.S. Steel and New York-based Acme met in Bonn."
    words = [(0, 4), (5, 10), (11, 14), (15, 18), (19, 29), (30, 34), (35, 38), (39, 41), (42, 47)]
    assert [text[a:b] for a, b in words][4] == "York-based"
    spans = [
        span(0, 1, "ORG"),
        span(2, 10, "ORG"),  # words split by punctuation: "U" and "S. Steel"
        span(15, 23, "LOC"),  # "New York" ends inside the word "York-based"
        span(31, 34, "ORG"),  # starts inside "Acme"
        span(42, 46, "LOC"),
    ]
    assert spans_to_word_tags(spans, words) == ["B-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "B-ORG", "O", "O", "B-LOC"]
    # the first span to touch a word wins; the next word continues the second span (seqeval reads
    # I-LOC after B-PER as a new LOC entity); an empty word is never labelled
    assert spans_to_word_tags([span(0, 3, "PER"), span(2, 8, "LOC")], [(0, 4), (4, 4), (5, 8)]) == [
        "B-PER",
        "O",
        "I-LOC",
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(list("ab. !?\n\t \"')AZ9é") + ["Mr.", "U.S.", "\n\n", "\n    ", "x" * 50]), max_size=80
    ).map("".join)
)
def test_segmentation_keeps_every_character(text):
    bounds = sentence_bounds(text)
    assert "".join(text[a:b] for a, b in bounds) == text
    assert all(a < b for a, b in bounds) and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))


def test_segmentation_rules():
    def pieces(text: str) -> list[str]:
        return [text[a:b] for a, b in sentence_bounds(text)]

    assert pieces("Mr. J. Smith of the U.S. Navy arrived. He left! Then? 3 more.") == [
        "Mr. J. Smith of the U.S. Navy arrived. ",
        "He left! ",
        "Then? ",
        "3 more.",
    ]
    # one sentence per line (a rebuilt CoNLL document, headlines, table rows): every line break counts
    assert pieces("SOCCER - JAPAN WIN\nNadim Ladki\nAL-AIN 1996-12-06\nJapan began .") == [
        "SOCCER - JAPAN WIN\n",
        "Nadim Ladki\n",
        "AL-AIN 1996-12-06\n",
        "Japan began .",
    ]
    # hard-wrapped newswire: only sentence ends and paragraph breaks count
    wrapped = (
        "Standard Oil Co and BP North America\nInc said they plan to form a venture to manage the\n"
        "money market borrowing and investment activities of both\ncompanies, the two firms said on Monday.\n"
        "    BP North America is a subsidiary of British Petroleum Co\nPlc.\n\n Reuter"
    )
    assert is_hard_wrapped(wrapped)
    assert pieces(wrapped)[0].startswith("Standard Oil Co and BP North America\nInc said")
    assert pieces(wrapped)[1].startswith("BP North America is a subsidiary of British Petroleum Co\nPlc.")
    assert pieces("ends here\nand continues lower-case") == ["ends here\nand continues lower-case"]
    # long whitespace runs stay linear (a row of blank lines must not stall the job)
    text = "A." + "\n" * 200_000 + "b"
    assert "".join(pieces(text)) == text


def test_context_windows_stay_inside_documents_and_cover_each_sentence_once(tiny_model_dir):
    from nerbatch.align import encode
    from nerbatch.inference import special_tokens_around
    from nerbatch.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    # documents alternate between all-PER and all-LOC words, so a window mixing two documents shows
    sentences = [
        sentence(" ".join(["Smith"] * n), " ".join(["B-PER"] * n), d)
        if d % 2 == 0
        else sentence(" ".join(["Paris"] * n), " ".join(["B-LOC"] * n), d)
        for d in range(12)
        for n in (3, 9, 14, 5, 20, 7)
    ]
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = encode(tokenizer, sentences, {x: i for i, x in enumerate(labels)}, 128).features
    prefix, suffix = map(len, special_tokens_around(tokenizer.backend_tokenizer))
    packed = pack_features(features, sentences, prefix, suffix, window=96, seed=3)
    assert pack_features(features, sentences, prefix, suffix, window=96, seed=3) == packed  # seeded

    def content(feature) -> list[int]:
        return feature.input_ids[prefix : len(feature.input_ids) - suffix]

    assert sum(len(content(f)) for f in packed) == sum(len(content(f)) for f in features)
    assert all(len(f.input_ids) <= 96 for f in packed)
    assert len({len(f.input_ids) for f in packed}) > 5  # window lengths are mixed
    assert any(f.n_words > 20 for f in packed)
    for feature in packed:
        kinds = {labels[x][2:] for x in feature.labels if x >= 0}
        assert len(kinds) == 1, kinds  # never two documents in one window
        assert feature.input_ids[:prefix] == features[0].input_ids[:prefix]


def test_tabular_documents_and_their_bad_input(tmp_path):
    rows = [
        {"doc": "b", "tokens": ["Bonn"], "ner_tags": ["B-LOC"]},
        {"doc": "a", "tokens": ["Kohl", "said"], "ner_tags": ["B-PER", "O"]},
        {"doc": "b", "tokens": ["rain", "."], "ner_tags": ["O", "O"]},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(str(path), document_column="doc")
    assert [d.text for d in build_documents(corpus)] == ["Bonn\nrain .", "Kohl said"]
    with pytest.raises(DataError, match="row 0: missing column 'document'"):
        load_corpus(str(path), document_column="document")
    rows[2]["doc"] = None
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="row 2: null in document column 'doc'"):
        load_corpus(str(path), document_column="doc")
    rows[2]["doc"] = ["b"]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="row 2: document column 'doc' holds a list"):
        load_corpus(str(path), document_column="doc")
    # copies of CoNLL that keep -DOCSTART- as a row: documents, and the row is not a sentence
    path.write_text(
        "\n".join(
            json.dumps({"tokens": t, "ner_tags": ["O"] * len(t)})
            for t in [["-DOCSTART-"], ["a", "b"], ["c"], ["-DOCSTART-"], ["d"]]
        )
    )
    corpus = load_corpus(str(path))
    assert corpus.has_documents and len(corpus) == 3 and [s.document for s in corpus.sentences] == [0, 0, 1]


def test_conll_documents_with_blank_lines_at_odd_places(tmp_path):
    path = tmp_path / "odd.conll"
    path.write_text(
        "\n\n-DOCSTART- -X- O O\n\n\nEU B-ORG\n\n\nrejects O\n-DOCSTART- -X- O O\n-DOCSTART- -X- O O\nBonn B-LOC\n\n"
    )
    corpus = read_conll(path)
    assert [s.words for s in corpus.sentences] == [["EU"], ["rejects"], ["Bonn"]]
    assert [s.document for s in corpus.sentences] == [0, 0, 1]  # the empty document takes no index
    assert [d.text for d in build_documents(corpus)] == ["EU\nrejects", "Bonn"]


@pytest.fixture(scope="module")
def valid_docs(tmp_path_factory) -> Path:
    """The first 30 validation documents, as CoNLL with -DOCSTART- lines."""
    sentences = [s for s in read_conll(need(CONLL / "valid.txt")).sentences if s.document < 30]
    return write_conll(sentences, tmp_path_factory.mktemp("valid-docs") / "valid30.conll", documents=True)


@pytest.mark.slow
@pytest.mark.parametrize("join", ["newline", "space"])
def test_document_scores_are_the_same_on_one_and_two_processes(tuned_model_dir, valid_docs, join):
    args = ["evaluate", str(tuned_model_dir), str(valid_docs), "--documents", "--max-length", "64", "--join", join]
    single, double = run(args), run(args, processes=2)
    assert "on 1 process" in single and "on 2 processes" in double and "document level" in single
    single, double = last_json(single), last_json(double)
    assert single == double
    assert single["overall_f1"] > 0.3  # the tuned model finds entities: equality is not trivial
    gold = sum(t.startswith("B-") for s in read_conll(valid_docs).sentences for t in s.tags)
    assert sum(single[t]["number"] for t in ["PER", "ORG", "LOC", "MISC"]) == gold


@pytest.mark.slow
def test_one_sentence_documents_score_like_sentence_evaluation(tuned_model_dir, valid_docs, tmp_path):
    """Each sentence its own document: the annotate path must see exactly what `evaluate` sees.

    Only sentences whose words the tokenizer does not split at punctuation: in "P." or "ex-England"
    annotate's `first` aggregation reads each piece's own prediction (as the transformers pipeline
    does), while sentence-level scoring reads the word's first subword only."""
    path = tmp_path / "sentences.jsonl"
    sentences = [s for s in read_conll(valid_docs).sentences if all(w.isalnum() or len(w) == 1 for w in s.words)]
    assert len(sentences) > 200
    path.write_text(
        "\n".join(json.dumps({"id": i, "tokens": s.words, "ner_tags": s.tags}) for i, s in enumerate(sentences))
    )
    by_sentence = last_json(run(["evaluate", str(tuned_model_dir), str(path)]))
    by_document = last_json(
        run(
            ["evaluate", str(tuned_model_dir), str(path), "--documents", "--document-column", "id", "--segment", "none"]
        )
    )
    assert by_sentence["overall_f1"] > 0.3
    # every entity metric is identical; tag accuracy differs only because spans rewrite a raw I-X
    # that opens an entity as B-X (seqeval counts both as the same entity)
    assert {k: v for k, v in by_sentence.items() if k != "overall_accuracy"} == {
        k: v for k, v in by_document.items() if k != "overall_accuracy"
    }


@pytest.mark.slow
def test_document_context_training_records_how_to_annotate(tiny_model_dir, valid_docs, tmp_path):
    from transformers import AutoModelForTokenClassification

    from nerbatch.inference import Tagger
    from nerbatch.modeling import load_tokenizer
    from nerbatch.train import sentence_length_cap

    out = tmp_path / "run"
    train = write_conll(read_conll(need(CONLL / "train.txt")).sentences[:300], tmp_path / "train.conll")
    job = tmp_path / "job.toml"
    job.write_text('context = "document"\ncontext_window = 96\n')
    job_args = ["train", "--config", str(job), "--model", str(tiny_model_dir), "--validation", str(valid_docs)]
    stdout = run(
        job_args
        + ["--train", str(valid_docs), "--output-dir", str(out), "--epochs", "1", "--batch-size", "16"]
        + ["--lone-share", "0.5"]
    )
    assert "document context" in stdout and "best epoch by document-level" in stdout
    # an epoch: every window and half of the lone sentences (none was split: each is one feature)
    counts = re.search(r"train: (\d+) sentences -> (\d+) features \((\d+) per epoch\).*\((\d+) longer", stdout)
    sentences, features, per_epoch, split = map(int, counts.groups())
    assert split == 0 and features > sentences and per_epoch == features - sentences + round(sentences / 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_by"] == "document"
    epoch = metrics["epochs"][0]
    assert {"overall_f1", "document", "document_space"} <= epoch.keys() and "overall_f1" in epoch["document_space"]
    scores = epoch["document_f1_by_segment_and_join"]
    assert set(scores) == {"none/newline", "none/space", "sentences/newline", "sentences/space"}
    # each segmentation is judged by its lower F1 over the two joins; the best of those is recorded
    lower = {s: min(scores[f"{s}/newline"], scores[f"{s}/space"]) for s in ("none", "sentences")}
    assert epoch["document_f1"] == max(lower.values())
    record = json.loads((out / "config.json").read_text())["nerbatch"]
    cap = sentence_length_cap(load_tokenizer(str(out)), read_conll(valid_docs))
    assert record == {"context": "document", "window": 96, "segment": max(lower, key=lower.get), "max_segment": cap}
    assert cap > 10  # the longest training sentence, in the tiny tokenizer's subwords
    assert epoch["document"]["overall_f1"] == scores[f"{record['segment']}/newline"]
    assert epoch["document_space"]["overall_f1"] == scores[f"{record['segment']}/space"]
    tagger = Tagger(AutoModelForTokenClassification.from_pretrained(out), load_tokenizer(str(out)), segment="sentences")
    assert (tagger.max_length, tagger.max_segment, tagger.settings()["max_segment"]) == (96, cap, cap)
    assert Tagger(tagger.model, load_tokenizer(str(out)), segment="sentences", max_segment=0).max_segment is None
    tagger = Tagger(tagger.model, load_tokenizer(str(out)))
    assert tagger.segment == record["segment"]
    assert Tagger(tagger.model, load_tokenizer(str(out)), segment="none").max_length == 96
    # training data without documents cannot give document context: refused before any work
    refused = CliRunner().invoke(main, job_args + ["--train", str(train), "--output-dir", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "context = document needs documents" in refused.output


def word_pieces(text: str, cap: int) -> list[str]:
    """The sentence view of `text` with segments capped at `cap` words (one subword per word here),
    as text."""
    import re

    from nerbatch.inference import subword_segments

    offsets = [m.span() for m in re.finditer(r"\S+", text)]
    segments = cap_segments(text, offsets, subword_segments(text, offsets), cap)
    assert [a for a, _ in segments][1:] == [b for _, b in segments][:-1]  # consecutive, covering
    assert (segments[0][0], segments[-1][1]) == (0, len(offsets))
    return [text[offsets[a][0] : offsets[b - 1][1]] for a, b in segments]


def test_a_dateline_run_into_the_first_sentence_is_cut_within_the_cap():
    text = (
        "SOCCER - JAPAN GET LUCKY WIN , CHINA IN SURPRISE DEFEAT . Nadim Ladki AL-AIN , United Arab Emirates "
        "1996-12-06 Japan began the defence of their Asian Cup title with a lucky 2-1 win against Syria in a "
        "Group C championship match on Friday ."
    )
    assert word_pieces(text, 1000) == [text[:57].strip(), text[58:]]  # no cap: the sentence rules alone
    pieces = word_pieces(text, 30)
    assert pieces == [
        "SOCCER - JAPAN GET LUCKY WIN , CHINA IN SURPRISE DEFEAT .",
        "Nadim Ladki AL-AIN , United Arab Emirates 1996-12-06",
        text[text.index("Japan began") :],
    ]
    assert all(len(p.split()) <= 30 for p in pieces)


def test_a_headline_run_is_cut_at_its_strongest_boundaries_and_a_sentence_is_never_cut_between_words():
    text = (
        "EU REJECTS GERMAN CALL TO BOYCOTT BRITISH LAMB Peter Blackburn BRUSSELS 1996-08-22 The European "
        "Commission said on Thursday it disagreed with German advice"
    )
    pieces = word_pieces(text, 11)
    assert pieces == [
        "EU REJECTS GERMAN CALL TO BOYCOTT BRITISH LAMB",
        "Peter Blackburn BRUSSELS 1996-08-22",
        "The European Commission said on Thursday it disagreed with German advice",
    ]
    # below the sentence's own length there is no boundary left: it stays whole for the windows
    assert word_pieces(text, 5)[-1] == pieces[-1]


def test_cut_strength_orders_the_boundaries():
    assert cut_strength(".", "The") == 4 and cut_strength("Peter", "said") == 0
    assert cut_strength("1996-08-22", "The") == 3 and cut_strength("said:", "the") == 3
    assert cut_strength("LAMB", "Peter") == 2 and cut_strength("-", "JAPAN") == 2
    assert cut_strength(",", "United") == 1 and cut_strength("2-1", "win") == 0
    assert cut_strength("U.S.", "Army") == 1 and cut_strength("Mr.", "Smith") == 1  # abbreviations: weak
