"""`nerbatch.encoder`: the plain-torch BERT that annotate runs, against transformers' own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from nerbatch import encoder, modeling
from nerbatch.inference import tag_texts
from nerbatch.precision import cast_bf16, quantize_int8

TEXTS = [
    "Peter Blackburn met officials of the European Commission in Brussels on Monday.",
    "BONN 1996-08-22 German farmers said they would fight the ban",
    "",
    "Short.",
]


def as_written_by_train(source, target):
    """A copy of a checkpoint with the record `nerbatch train` writes into config.json."""
    shutil.copytree(source, target)
    edit_json(target / "config.json", nerbatch={"context": "sentence", "segment": "sentences", "window": 128})
    return target


def both_loaders(model_dir):
    """(plain-torch model, Rust tokenizer) and (transformers model, transformers tokenizer) of one checkpoint."""
    plain = modeling.load_token_classifier(str(model_dir), rust_tokenizer=True)
    reference = modeling._load_with_transformers(str(model_dir))
    assert type(plain[0]).__name__ == "BertTokenClassifier"
    assert type(reference[0]).__name__ == "BertForTokenClassification"
    return plain, reference


def padded_batch(tokenizer):
    words = [text.split() or ["x"] for text in TEXTS]
    return tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")


def test_same_logits_spans_and_tokenizer_as_transformers(tiny_model_dir, tmp_path):
    """fp32 logits (padded batch) agree to float rounding, the int8 and bf16 models built from each
    agree too, and the spans of whole texts are the same; the Rust tokenizer is transformers' own."""
    (model, rust), (reference, tokenizer) = both_loaders(as_written_by_train(tiny_model_dir, tmp_path / "m"))
    assert rust.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert (rust.pad_token_id, rust.model_max_length, len(rust)) == (
        tokenizer.pad_token_id,
        tokenizer.model_max_length,
        len(tokenizer),
    )
    batch = padded_batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert batch["attention_mask"].min() == 0  # some rows are padded
    with torch.inference_mode():
        for build in (lambda m: m, lambda m: quantize_int8(m, rust), cast_bf16):
            mine, theirs = build(model)(**inputs).logits, build(reference)(**inputs).logits
            real = batch["attention_mask"].bool()
            assert torch.allclose(mine[real].float(), theirs[real].float(), atol=1e-5, rtol=1e-4)
    spans = tag_texts(TEXTS, model, rust, precision="fp32")
    assert spans == tag_texts(TEXTS, reference, tokenizer, precision="fp32")
    assert sum(map(len, spans)) > 0  # a random model tags something: the comparison is not of empties


@pytest.mark.slow
def test_a_real_encoder_classifier_matches(minilm_dir, tmp_path):
    """all-MiniLM-L6-v2 (uncased, 30k vocabulary) with a token-classification head: the same logits."""
    from transformers import AutoTokenizer, BertForTokenClassification

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    torch.manual_seed(0)
    classifier = BertForTokenClassification.from_pretrained(
        str(minilm_dir), num_labels=len(labels), id2label=dict(enumerate(labels))
    )
    classifier.save_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(tmp_path / "saved")
    (model, rust), (reference, tokenizer) = both_loaders(as_written_by_train(tmp_path / "saved", tmp_path / "m"))
    assert rust.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    batch = padded_batch(tokenizer)
    with torch.inference_mode():
        mine = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(mine[real], theirs[real], atol=1e-5, rtol=1e-4)


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def edit_json(path, **changes):
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def test_other_forms_load_through_transformers(tiny_model_dir, tmp_path):
    """What the plain module does not build goes to transformers, with a reason for each."""
    directory = copy_model(tiny_model_dir, tmp_path / "gelu-new")
    config = encoder.read_config(directory)
    assert encoder.unsupported(directory, config) is None
    edit_json(directory / "config.json", hidden_act="gelu_new")
    assert "activation" in encoder.unsupported(directory, encoder.read_config(directory))
    model, _ = modeling.load_token_classifier(str(directory), rust_tokenizer=True)
    assert type(model).__name__ == "BertForTokenClassification"

    # a checkpoint nerbatch did not write: the plain model, with transformers' tokenizer (which
    # rebuilds a BERT tokenizer.json from its own defaults rather than take it as it is)
    model, tokenizer = modeling.load_token_classifier(str(tiny_model_dir), rust_tokenizer=True)
    assert type(model).__name__ == "BertTokenClassifier" and type(tokenizer).__module__.startswith("transformers")

    sparse = copy_model(tiny_model_dir, tmp_path / "sparse-config")  # BertConfig's defaults fill the gaps
    values = json.loads((sparse / "config.json").read_text())
    assert values.pop("layer_norm_eps") == 1e-12 and values.pop("type_vocab_size") == 2
    (sparse / "config.json").write_text(json.dumps(values))
    assert type(modeling.load_token_classifier(str(sparse))[0]).__name__ == "BertTokenClassifier"

    broken = copy_model(tiny_model_dir, tmp_path / "broken-config")  # transformers' one-line error, as before
    (broken / "config.json").write_text("{not json")
    with pytest.raises(modeling.ModelError, match="could not load model"):
        modeling.load_token_classifier(str(broken), rust_tokenizer=True)

    extra = copy_model(tiny_model_dir, tmp_path / "extra-weight")
    from safetensors.torch import load_file, save_file

    weights = load_file(extra / encoder.WEIGHTS)
    save_file({**weights, "bert.encoder.layer.0.adapter.weight": torch.zeros(2)}, extra / encoder.WEIGHTS)
    assert encoder.load_classifier(extra, encoder.read_config(extra)) is None
    pooled = copy_model(tiny_model_dir, tmp_path / "pooler")
    save_file({**weights, "bert.pooler.dense.bias": torch.zeros(32)}, pooled / encoder.WEIGHTS)
    assert encoder.load_classifier(pooled, encoder.read_config(pooled)) is not None


@pytest.mark.slow
def test_annotating_imports_no_transformers(tiny_model_dir, tmp_path):
    """A whole annotate process on a BERT checkpoint never imports transformers (start-up time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    script = (
        "import sys; from nerbatch.cli import main; sys.argv[0] = 'nerbatch'\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'transformers' or m == 'torch._dynamo'))"
    )
    model = as_written_by_train(tiny_model_dir, tmp_path / "m")
    args = ["annotate", str(model), str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 1
