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


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    path = tmp_path / "bom.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nRome NNP B-NP B-LOC\nwins VBZ B-VP O\n", encoding="utf-8-sig")
    corpus = read_conll(path)
    assert corpus.has_documents and corpus.documents == 1
    assert [s.words for s in corpus.sentences] == [["Rome", "wins"]]


def test_unreadable_files_are_errors_naming_the_file_and_line(tmp_path):
    latin = tmp_path / "latin.conll"
    latin.write_bytes("Rome B-LOC\n\nZ\u00fcrich B-LOC\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.conll:3: not UTF-8 text \(byte 0xfc"):
        read_conll(latin)
    with pytest.raises(DataError, match="is a directory"):
        load_corpus(str(tmp_path))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["Rome"], "ner_tags": ["B-LOC"]}) + "\n{'tokens': ['Oslo']}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON value"):
        load_corpus(str(jsonl))
    fake = tmp_path / "fake.parquet"
    fake.write_text("tokens,ner_tags\n")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        load_corpus(str(fake))


@pytest.mark.parametrize("text", ["", "\n\n", "-DOCSTART- -X- -X- O\n\n"])
def test_a_corpus_without_sentences_is_an_error(tmp_path, text):
    path = tmp_path / "empty.conll"
    path.write_text(text)
    with pytest.raises(DataError, match=r"empty\.conll: no sentences"):
        load_corpus(str(path))


def test_a_line_that_lost_a_column_is_an_error_not_a_new_tag(tmp_path):
    path = tmp_path / "short.conll"
    path.write_text("Rome NNP B-NP B-LOC\nwins VBZ B-VP O\n\nlamb NN I-NP\n")
    # read as `word ... tag`, line 4 would make the chunk tag I-NP an entity type
    with pytest.raises(DataError, match=r"short\.conll:4: 3 columns \('lamb NN I-NP'\) where line 1 has 4"):
        read_conll(path)


def test_tab_separated_words_keep_no_space(tmp_path):
    path = tmp_path / "tabs.tsv"
    path.write_text("He\tO\nvisited\tO \nParis\tB-LOC\n\n")
    assert read_conll(path).sentences[0].words == ["He", "visited", "Paris"]
    path.write_text("He\tO\nvisited\tO\nNew York\tB-LOC\n\n")
    with pytest.raises(DataError, match=r"tabs\.tsv:3: the tab-separated field 'New York' holds a space"):
        read_conll(path)


@pytest.mark.parametrize("tag", ["ORG", "B-", "E-PER"])
def test_a_training_tag_that_is_not_iob_names_its_line(tmp_path, tag):
    path = tmp_path / "train.conll"
    path.write_text(f"Rome B-LOC\nwins O\n\nAcme {tag}\n")
    with pytest.raises(DataError, match=rf"train\.conll:4: tag '{tag}' on word 'Acme' is neither 'O'"):
        build_label_list(read_conll(path))
