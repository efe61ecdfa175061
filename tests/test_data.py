"""Corpus readers: CoNLL (4- and 2-column, IOB1), Parquet with ClassLabel, JSON Lines, label lists."""

import json

import pytest

from nerbatch.data import DataError, build_label_list, check_labels, corpus_stats, load_corpus, read_conll, to_iob2

from conftest import CONLL, CONLL_LABELS, need


@pytest.mark.parametrize(
    "name, counts",
    [
        ("train.txt", (14041, 946, 203621, {"PER": 6600, "ORG": 6321, "LOC": 7140, "MISC": 3438})),
        ("valid.txt", (3250, 216, 51362, {"PER": 1842, "ORG": 1341, "LOC": 1837, "MISC": 922})),
    ],
)
def test_conll_reader_matches_published_counts(name, counts):
    corpus = read_conll(need(CONLL / name))
    stats = corpus_stats(corpus)
    assert (stats.sentences, stats.documents, stats.tokens, stats.entities) == counts
    assert set(build_label_list(corpus)) == set(CONLL_LABELS)
    assert build_label_list(corpus)[0] == "O"


def test_iob1_is_converted_to_iob2():
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        "B-PER",
        "I-PER",
        "O",
        "B-LOC",
        "B-LOC",
        "B-ORG",
    ]


def test_two_column_file_and_label_order(tmp_path):
    path = tmp_path / "two.conll"
    path.write_text("John I-PER\nlives O\nin O\nParis I-LOC\n\nAcme I-ORG\nCorp I-ORG\n")
    corpus = load_corpus(str(path))
    assert [s.words for s in corpus.sentences] == [["John", "lives", "in", "Paris"], ["Acme", "Corp"]]
    assert corpus.sentences[1].tags == ["B-ORG", "I-ORG"]
    assert build_label_list(corpus) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_unknown_validation_tag_names_file_and_line(tmp_path):
    path = tmp_path / "valid.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\nAda NNP B-NP B-PER\nsaid VBD B-VP O\n\nin IN B-PP O\nOslo NNP B-NP B-CITY\n"
    )
    corpus = read_conll(path)
    with pytest.raises(DataError, match=r"valid\.conll:7: unknown tag 'B-CITY'"):
        check_labels(corpus, {label: i for i, label in enumerate(CONLL_LABELS)})


def test_parquet_with_classlabel_ids(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=CONLL_LABELS)),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"tokens": [["EU", "rejects", "German", "call"]], "ner_tags": [[3, 0, 7, 0]]}, features=features
    )
    ds.to_parquet(tmp_path / "x.parquet")
    corpus = load_corpus(str(tmp_path / "x.parquet"))
    assert corpus.sentences[0].tags == ["B-ORG", "O", "B-MISC", "O"]
    assert build_label_list(corpus) == CONLL_LABELS  # the declared names and order, not the tags seen


def test_jsonl_with_tag_strings_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"tokens": ["Rome", "wins"], "ner_tags": ["B-LOC", "O"]}) + "\n")
    assert load_corpus(str(good)).sentences[0].tags == ["B-LOC", "O"]
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"tokens": ["Rome"], "ner_tags": [5]}) + "\n")
    with pytest.raises(DataError, match="declares no label names"):
        load_corpus(str(ids))
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text(json.dumps({"tokens": ["Rome", "wins"], "ner_tags": ["B-LOC"]}) + "\n")
    with pytest.raises(DataError, match="row 0: 2 words but 1 tags"):
        load_corpus(str(ragged))
    with pytest.raises(DataError, match="no such file"):
        load_corpus(str(tmp_path / "missing.conll"))


def test_words_with_unicode_spaces_stay_whole(tmp_path):
    path = tmp_path / "nbsp.conll"
    path.write_text("1\u00a0000 CD I-NP O\nParis NNP I-NP B-LOC\n\n", encoding="utf-8")
    assert read_conll(path).sentences[0].words == ["1\u00a0000", "Paris"]


def test_out_of_range_tag_id_is_an_error(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=CONLL_LABELS)),
        }
    )
    datasets.Dataset.from_dict({"tokens": [["EU"]], "ner_tags": [[3]]}, features=features).to_parquet(
        tmp_path / "x.parquet"
    )
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "x.parquet")
    import pyarrow as pa

    bad = table.set_column(1, "ner_tags", pa.array([[-100]], pa.list_(pa.int64())))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="row 0: tag id -100 is not one of the 9 labels"):
        load_corpus(str(tmp_path / "bad.parquet"))
