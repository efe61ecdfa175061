"""Label alignment and feature encoding."""

from nerbatch.align import IGNORE, align_labels, b_to_i_map, encode
from nerbatch.data import Sentence

from conftest import CONLL_LABELS


def test_reference_alignment_example():
    b_to_i = b_to_i_map(CONLL_LABELS)
    word_ids = [None, 0, 0, 1, 2, 3, None]
    assert align_labels([3, 0, 7, 0], word_ids, b_to_i) == [-100, 3, 4, 0, 7, 0, -100]
    assert align_labels([3, 0, 7, 0], word_ids, b_to_i, label_all_subwords=False) == [-100, 3, -100, 0, 7, 0, -100]


def test_b_to_i_leaves_i_and_o_alone():
    assert b_to_i_map(["O", "B-PER", "I-PER", "B-X"]) == [0, 2, 2, 3]  # B-X has no I-X: unchanged


def test_long_sentence_is_split_between_words_not_cut(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["Johannesburg", "and", "Washington"] * 30
    tags = ["B-LOC", "O", "B-LOC"] * 30
    label2id = {label: i for i, label in enumerate(CONLL_LABELS)}
    encoded = encode(
        tokenizer, [Sentence(words, tags, "mem", row=0)], label2id, max_length=32, label_all_subwords=False
    )
    assert encoded.split_sentences == 1
    assert len(encoded.features) > 1
    assert all(len(f.input_ids) <= 32 for f in encoded.features)
    # every word is covered exactly once, in order, and keeps its label on its first subword
    covered = [f.first_word + w for f in encoded.features for w in f.scored_words]
    assert covered == list(range(len(words)))
    labels = [label for f in encoded.features for label in f.labels if label != IGNORE]
    assert labels == [label2id[t] for t in tags]


def test_a_word_longer_than_max_length_is_a_one_line_error(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from nerbatch.cli import main

    data = tmp_path / "long.conll"
    every_label = "".join(f"w{i} {label}\n" for i, label in enumerate(CONLL_LABELS))  # the model's head has all 9
    data.write_text("-DOCSTART- O\n\nThe O\n" + "zq" * 45 + " B-MISC\nends O\n\n" + every_label)
    result = CliRunner().invoke(
        main,
        ["train", "--model", str(tiny_model_dir), "--train", str(data), "--validation", str(data)]
        + ["--output-dir", str(tmp_path / "out"), "--max-length", "16"],
    )
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "long.conll:4: the word 'zqzq" in result.output and "more than max length allows" in result.output
