"""`nerbatch.modeling`: a model that cannot annotate is refused before any work: one line, non-zero status,
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.cli import main
from nerbatch.modeling import ModelError, entity_scheme, load_token_classifier


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["Angela Merkel met Joe Biden in Berlin.", "It rained."]}), path)
    return path


def with_config(source: Path, target: Path, **changes) -> Path:
    """A copy of the model in `source` whose config.json has `changes` applied."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def base_encoder(tiny_model_dir: Path, target: Path) -> Path:
    """The tiny model saved as a bare BertModel: what `nerbatch train` starts from, with no head."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_model_dir)
    model.bert.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, target / name)
    return target


def refused(args: list[str], output: Path | None = None) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # not a traceback
    message = result.output.strip().splitlines()
    assert len(message) == 1, result.output
    if output is not None:
        assert not output.exists(), "nothing may be written for a refused model"
    return message[0]


def every_command(model: Path, docs: Path, tmp_path: Path) -> list[tuple[list[str], Path | None]]:
    out = tmp_path / "out"
    return [
        (["annotate", str(model), str(docs), "--output", str(out), "--no-progress"], out),
        (["predict", str(model), "Angela Merkel met Joe Biden."], None),
        (["evaluate", str(model), str(Path(__file__).parents[1] / "nerbatch/demo_data/valid.conll")], None),
        (
            ["evaluate", str(model), str(Path(__file__).parents[1] / "nerbatch/demo_data/valid.conll"), "--documents"],
            None,
        ),
    ]


def test_base_encoder_is_refused_by_every_command(tiny_model_dir, docs, tmp_path):
    model = base_encoder(tiny_model_dir, tmp_path / "encoder")
    for args, out in every_command(model, docs, tmp_path):
        message = refused(args, out)
        assert "BertModel" in message and "base encoder" in message and str(model) in message


def test_checkpoint_without_architectures_but_missing_head_is_refused(tiny_model_dir, docs, tmp_path):
    """No `architectures` to go by: the missing classifier weights give it away."""
    model = base_encoder(tiny_model_dir, tmp_path / "encoder")
    config = json.loads((model / "config.json").read_text())
    config.pop("architectures")
    config.update(
        id2label={str(i): label for i, label in enumerate(["O", "B-PER", "I-PER"])},
        label2id={"O": 0, "B-PER": 1, "I-PER": 2},
    )
    (model / "config.json").write_text(json.dumps(config))
    message = refused(
        ["annotate", str(model), str(docs), "--output", str(tmp_path / "out"), "--no-progress"], tmp_path / "out"
    )
    assert "classifier.weight" in message and "initialised at random" in message


def test_sequence_classifier_and_masked_lm_are_refused(tiny_model_dir, docs, tmp_path):
    for arch, what in [
        ("BertForSequenceClassification", "sequence classifier"),
        ("BertForMaskedLM", "masked language model"),
    ]:
        model = with_config(tiny_model_dir, tmp_path / arch, architectures=[arch])
        message = refused(
            ["annotate", str(model), str(docs), "--output", str(tmp_path / "out"), "--no-progress"], tmp_path / "out"
        )
        assert arch in message and what in message


def test_labels_that_are_not_entity_tags_are_refused(tiny_model_dir, docs, tmp_path):
    cases = {
        "generic": ["LABEL_0", "LABEL_1", "LABEL_2"],
        "no_o": ["B-PER", "I-PER", "B-LOC"],
        "sentiment": ["O", "positive-ish", "X-Y"],
    }
    for name, labels in cases.items():
        model = with_config(
            tiny_model_dir,
            tmp_path / name,
            id2label={str(i): label for i, label in enumerate(labels)},
            label2id={label: i for i, label in enumerate(labels)},
        )
        if name == "generic":
            model_args = ["predict", str(model), "Angela Merkel"]
            assert "are not entity tags" in refused(model_args)
        message = refused(
            ["annotate", str(model), str(docs), "--output", str(tmp_path / "out"), "--no-progress"], tmp_path / "out"
        )
        assert "are not entity tags" in message and "IOBES" in message


def test_entity_schemes():
    assert entity_scheme(["O", "B-PER", "I-PER"]) == "IOB1/IOB2"
    assert entity_scheme(["O", "B-PER", "I-PER", "E-PER", "S-PER"]) == "IOBES"
    assert entity_scheme(["O", "B-PER", "I-PER", "L-PER", "U-PER"]) == "BILOU"
    assert entity_scheme(["O", "PER", "ORG"]) == "plain types"
    assert entity_scheme(["PER", "ORG"]) is None
    assert entity_scheme(["O", "LABEL_1"]) is None
    assert entity_scheme(["O", "B-PER", "X-PER"]) is None
    assert entity_scheme(["O", "B-PER", "ORG"]) is None


def test_good_model_still_loads_without_noise(tiny_model_dir, docs, tmp_path, capfd):
    model, tokenizer = load_token_classifier(str(tiny_model_dir))
    assert model.config.num_labels == 9 and tokenizer.is_fast and not model.training
    assert "LOAD REPORT" not in capfd.readouterr().err
    result = CliRunner().invoke(
        main, ["annotate", str(tiny_model_dir), str(docs), "--output", str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(next((tmp_path / "out").glob("part-*.parquet"))).num_rows == 2


def test_hub_id_offline_is_one_line(docs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refused(
        ["annotate", "dslim/bert-base-NER", str(docs), "--output", str(tmp_path / "out"), "--no-progress"],
        tmp_path / "out",
    )
    assert "dslim/bert-base-NER" in message and "offline" in message
    with pytest.raises(ModelError):
        load_token_classifier("dslim/bert-base-NER")


def test_a_checkpoint_saved_in_bf16_loads_in_fp32(tiny_model_dir, tmp_path):
    """--precision decides the arithmetic, not the dtype the weights were saved in (transformers 5
    would otherwise keep bf16 and run bf16 on a CPU under `fp32`)."""
    import shutil

    import torch
    from transformers import AutoModelForTokenClassification

    saved = tmp_path / "bf16"
    AutoModelForTokenClassification.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, saved / name)
    model, _ = load_token_classifier(str(saved))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_model_without_tokenizer_files_is_refused_by_every_command(tiny_model_dir, docs, tmp_path):
    """transformers makes a tokenizer of the special tokens alone there: every word would be [UNK]."""
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model / name)
    for args, out in every_command(model, docs, tmp_path):
        message = refused(args, out)
        assert str(model) in message and "no tokenizer files" in message


def test_a_truncated_weights_file_is_refused_by_every_command(tiny_model_dir, docs, tmp_path):
    model = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for args, out in every_command(model, docs, tmp_path):
        assert f"{model}: could not load its weights" in refused(args, out)


def test_a_missing_model_path_is_not_taken_for_a_hub_id(docs, tmp_path):
    for model in (str(tmp_path / "nowhere"), "./nowhere", "../nowhere"):
        assert refused(["predict", model, "Angela Merkel"]) == f"Error: {model}: no such model directory"


def test_a_window_longer_than_the_model_takes_is_refused(tiny_model_dir, docs, tmp_path):
    """The tiny model has 128 positions: a longer --max-length would fail on the first long input."""
    for args, out in every_command(tiny_model_dir, docs, tmp_path):
        message = refused(args + ["--max-length", "200"], out)
        assert "max length 200 is more than the 128 subwords this model takes" in message
