"""Corpus readers: CoNLL (4- and 2-column, IOB1), Parquet with ClassLabel, JSON Lines, label lists."""

import json

import pytest

from nerbatch.data import DataError, build_label_list, check_labels, corpus_stats, load_corpus, read_conll, to_iob2

from conftest import CONLL, CONLL_LABELS, REPO, need


@pytest.mark.parametrize(
    "name, counts",
    [
        ("train.txt", (14041, 946, 203621, {"PER": 6600, "ORG": 6321, "LOC": 7140, "MISC": 3438})),
        ("valid.txt", (3250, 216, 51362, {"PER": 1842, "ORG": 1341, "LOC": 1837, "MISC": 922})),
    ],
)
@pytest.mark.slow
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


# --- hub datasets, without the hub: a local directory laid out like a Parquet dataset repository


def write_hub_copy(root, splits, labels=CONLL_LABELS):
    """A dataset repository as the hub stores one: `data/<split>-00000-of-00001.parquet`, written by
    `datasets` (so the ClassLabel names travel in the Parquet schema metadata)."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=labels)),
        }
    )
    for split, rows in splits.items():
        columns = {
            "id": [str(i) for i in range(len(rows))],
            "tokens": [w for w, _ in rows],
            "ner_tags": [t for _, t in rows],
        }
        (root / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(columns, features=features).to_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet"
        )
    return root


HUB_ROWS = {
    "train": [(["EU", "rejects", "German", "call"], [3, 0, 7, 0]), (["Peter", "Blackburn"], [1, 2])],
    "validation": [(["BRUSSELS", "1996-08-22"], [5, 0])],
    "test": [(["Japan", "wins"], [5, 0]), (["Nadim", "Ladki"], [1, 2]), (["AL-AIN"], [5])],
}


def test_a_local_copy_of_a_hub_dataset_reads_through_load_dataset(tmp_path):
    root = write_hub_copy(tmp_path / "lhoestq" / "conll2003", HUB_ROWS)
    train = load_corpus(str(root), "train")
    assert [s.words for s in train.sentences] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert train.sentences[0].tags == ["B-ORG", "O", "B-MISC", "O"] and train.label_names == CONLL_LABELS
    assert train.name == f"{root}[train]" and not train.has_documents
    test = load_corpus(f"{root}:test", "validation")  # an explicit split wins
    assert [s.tags for s in test.sentences] == [["B-LOC", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    # named after CoNLL-2003 but far smaller: the user is told how it differs
    assert train.warnings == [
        f"{root}[train]: 2 sentences where CoNLL-2003 has 14,041 (train) / 3,250 (validation) / 3,453 (test); "
        "check that this is the copy you mean"
    ]


def test_the_reference_job_file_names_a_parquet_copy_that_loads(tmp_path, monkeypatch):
    """The job file's exact spec goes through the same `load_dataset` call, served from a local copy."""
    import datasets

    from nerbatch.config import load_config
    from nerbatch.data import CONLL2003_HUB

    cfg = load_config(REPO / "jobs" / "conll2003-bert-base-cased.toml", {})
    assert cfg.train == cfg.validation == CONLL2003_HUB
    copy = write_hub_copy(tmp_path / "hub", HUB_ROWS)
    real = datasets.load_dataset
    calls = []

    def from_local_copy(name, **kwargs):
        calls.append((name, kwargs))
        return real(str(copy), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_local_copy)
    corpus = load_corpus(cfg.validation, "validation")
    assert calls == [(CONLL2003_HUB, {"split": "validation", "revision": None})]
    assert corpus.sentences[0].tags == ["B-LOC", "O"] and corpus.label_names == CONLL_LABELS
    load_corpus("eriktks/conll2003@refs/convert/parquet:test", "train")
    assert calls[-1] == ("eriktks/conll2003", {"split": "test", "revision": "refs/convert/parquet"})


def test_a_script_dataset_is_named_as_such_not_as_offline(monkeypatch):
    import datasets

    def script_repository(name, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found conll2003.py")

    monkeypatch.setattr(datasets, "load_dataset", script_repository)
    with pytest.raises(DataError) as raised:
        load_corpus("conll2003", "train")
    message = str(raised.value)
    assert "\n" not in message and "offline" not in message
    assert message.startswith("conll2003 is a dataset loading script, which datasets >= 4 no longer runs")
    assert "conll2003@refs/convert/parquet" in message and "lhoestq/conll2003" in message


def test_an_unreachable_hub_says_so_and_what_to_pass(monkeypatch):
    import datasets

    def offline(name, **kwargs):
        raise ConnectionError("Couldn't reach 'lhoestq/conll2003' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'lhoestq/conll2003' split 'train': the hub is not reachable \(HF_HUB_OFF"):
        load_corpus("lhoestq/conll2003", "train")


def test_conll2003_by_any_name_is_checked_for_sizes_and_label_order(tmp_path):
    from nerbatch.data import conll2003_differences

    shuffled = ["O", "B-ORG", "B-MISC", "B-PER", "I-PER", "B-LOC", "I-ORG", "I-MISC", "I-LOC"]  # tner's order
    root = write_hub_copy(tmp_path / "tner" / "conll2003", {"validation": HUB_ROWS["validation"]}, shuffled)
    warnings = load_corpus(str(root), "validation").warnings
    assert len(warnings) == 2
    assert "1 sentences where CoNLL-2003 has" in warnings[0]
    assert f"labels {shuffled} where CoNLL-2003 has {CONLL_LABELS}" in warnings[1]
    # a file that does not name itself CoNLL-2003 is the user's own data: not checked
    own = write_hub_copy(tmp_path / "my-ner", {"validation": HUB_ROWS["validation"]}, shuffled)
    assert load_corpus(str(own), "validation").warnings == []
    # string tags: the entity types are compared
    corpus = load_corpus(str(write_conll(tmp_path / "conll2003" / "valid.txt")))
    assert conll2003_differences(corpus, None)[-1].endswith(
        "entity types ['CITY', 'PER'] where CoNLL-2003 has ['LOC', 'MISC', 'ORG', 'PER']; "
        "check that this is the copy you mean"
    )


def write_conll(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("-DOCSTART- -X- -X- O\n\nAda NNP B-NP B-PER\nin IN B-PP O\nOslo NNP B-NP B-CITY\n")
    return path


@pytest.mark.slow
def test_the_published_conll2003_files_pass_the_check():
    for name, split in (("train.txt", "train"), ("valid.txt", "validation")):
        assert load_corpus(str(need(CONLL / name)), split).warnings == []
