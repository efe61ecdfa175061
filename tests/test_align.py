"""Label alignment and feature encoding."""

from conftest import CONLL_LABELS
from nerbatch.align import IGNORE, align_labels, b_to_i_map, encode
from nerbatch.data import Sentence


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
    encoded = encode(tokenizer, [Sentence(words, tags, "mem", row=0)], label2id, max_length=32,
                     label_all_subwords=False)
    assert encoded.split_sentences == 1
    assert len(encoded.features) > 1
    assert all(len(f.input_ids) <= 32 for f in encoded.features)
    # every word is covered exactly once, in order, and keeps its label on its first subword
    covered = [f.first_word + w for f in encoded.features for w in f.scored_words]
    assert covered == list(range(len(words)))
    labels = [label for f in encoded.features for label in f.labels if label != IGNORE]
    assert labels == [label2id[t] for t in tags]
