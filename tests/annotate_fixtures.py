"""Fixtures for the annotate tests: a tiny BERT briefly fine-tuned on CoNLL so it predicts real entities.

Import the fixture into a test module with `from annotate_fixtures import tuned_model_dir  # noqa: F401`.
It is a plain torch loop (not `nerbatch train`, which is built separately) with a fixed step count and
seed, so the model is the same on every run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import CONLL, need

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
    sentences = packed(read_conll(need(CONLL / "train.txt")).sentences, PACK_WORDS)
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


@pytest.fixture(scope="session")
def tuned_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned for a few hundred steps on CoNLL-2003 train (entity F1 well above chance)."""
    return fine_tune(tiny_model_dir, tmp_path_factory.mktemp("tuned-bert"))
