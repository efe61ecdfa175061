"""The tests' models: a tiny BERT with a WordPiece tokenizer trained here, and a short fine-tuning.

Plain functions with no pytest in them, so that the GPU benchmark's dry run builds the same models
(`from tests.models import ...`, run from the repository root). The fixtures in `conftest.py` call them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NERBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))
CONLL = SHARED_DATA / "conll2003"
REUTERS = SHARED_DATA / "reuters21578" / "reuters21578.parquet"
DEMO_DATA = REPO / "nerbatch" / "demo_data"
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


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


TUNE_STEPS = 700


TUNE_BATCH = 16


PACK_WORDS = 90


def packed(sentences: list, words: int) -> list:
    """Join consecutive sentences up to `words` words, so every position embedding up to the model's
    length gets trained (CoNLL sentences alone rarely pass position 50; windows use all 128)."""
    from nerbatch.data import Sentence

    out: list = []
    for s in sentences:
        if out and len(out[-1].words) + len(s.words) <= words:
            out[-1] = Sentence(out[-1].words + s.words, out[-1].tags + s.tags, s.source, line=out[-1].line)
        else:
            out.append(s)
    return out


def fine_tune(base: Path, out: Path, steps: int = TUNE_STEPS) -> Path:
    """Copy the model in `base` to `out` and train it for `steps` steps on the CoNLL train split."""
    import torch
    from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

    from nerbatch.align import encode
    from nerbatch.data import read_conll
    from nerbatch.modeling import load_tokenizer

    shutil.copytree(base, out, dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(out))
    model = AutoModelForTokenClassification.from_pretrained(out)
    sentences = packed(read_conll(CONLL / "train.txt").sentences, PACK_WORDS)
    features = encode(tokenizer, sentences, model.config.label2id, 128).features
    collate = DataCollatorForTokenClassification(tokenizer)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and faster for a model this small
    try:
        model.train()
        for _ in range(steps):
            pick = torch.randint(len(features), (TUNE_BATCH,), generator=generator).tolist()
            batch = collate([features[i].to_model_input() for i in pick])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    return out
