"""--precision: int8 on CPU keeps the spans of fp32 (tiny tuned model), bad combinations are refused,
and the precision is part of the output's identity (metadata, resume)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import AutoModelForTokenClassification

from nerbatch.cli import main
from nerbatch.errors import OptionError
from nerbatch.inference import Annotator
from nerbatch.modeling import load_tokenizer
from nerbatch.precision import is_quantized, resolve_precision, sensitive_linears


def test_bad_combinations_are_refused():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("int8", cpu) == "int8"
    with pytest.raises(OptionError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(OptionError, match="int8 is for CPUs"):
        resolve_precision("int8", gpu)
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        with pytest.raises(OptionError, match="no native bf16"):
            resolve_precision("bf16", cpu)


def test_int8_keeps_sensitive_layers_and_the_predictions(tuned_model_dir):
    model = AutoModelForTokenClassification.from_pretrained(tuned_model_dir).eval()
    tokenizer = load_tokenizer(str(tuned_model_dir))
    assert sensitive_linears(model) == {"classifier", "bert.encoder.layer.0.output.dense"}
    texts = ["Peter Blackburn of the European Commission said in Brussels on Monday that Germany agreed ."] * 3
    full, small = Annotator(model, tokenizer), Annotator(model, tokenizer, precision="int8")
    assert small.model is not model and type(model.classifier) is torch.nn.Linear  # the caller's model untouched
    assert type(small.model.classifier) is torch.nn.Linear  # kept in fp32
    assert isinstance(small.model.bert.encoder.layer[1].output.dense, DynamicLinear) and is_quantized(small.model)
    assert not is_quantized(model)
    x = torch.randn(4, 32)  # activations are quantized over the full 8 bits, not torch's default 7
    layer = small.model.bert.encoder.layer[1].attention.self.query
    full_range = torch.ops.quantized.linear_dynamic(x, layer._packed_params._packed_params, reduce_range=False)
    assert torch.equal(layer(x), full_range)
    a, b = full.encode(texts), small.encode(texts)
    full.forward(a)
    small.forward(b)
    agree = np.mean([(x.probs.argmax(1) == y.probs.argmax(1)).mean() for x, y in zip(a, b)])
    assert agree >= 0.9 and not np.allclose(a[0].probs, b[0].probs)  # int8 ran, and kept the labels


def test_precision_is_recorded_and_a_change_is_refused_on_resume(tuned_model_dir, tmp_path):
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["Angela Merkel met Joe Biden in Berlin .", "It rained ."]}), source)
    out = tmp_path / "out"
    args = ["annotate", str(tuned_model_dir), str(source), "--output", str(out), "--id-column", "id", "--no-progress"]
    assert CliRunner().invoke(main, args + ["--precision", "int8"]).exit_code == 0
    meta = pq.read_metadata(next(out.glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"nerbatch.options"])["precision"] == "int8"
    refused = CliRunner().invoke(main, args + ["--precision", "fp32"])
    assert refused.exit_code == 1 and "precision" in refused.output and "different run" in refused.output
    fp16 = CliRunner().invoke(main, args + ["--precision", "fp16", "--overwrite"])
    assert fp16.exit_code == 1 and "fp16 needs a GPU" in fp16.output and len(fp16.output.strip().splitlines()) == 1
