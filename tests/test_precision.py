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
from nerbatch.inference import Tagger
from nerbatch.modeling import load_tokenizer
from nerbatch.precision import (
    INT8_SCHEME,
    AutocastWithFallback,
    OutlierSplitLinear,
    _FullRangeLinear,
    calibration_batches,
    first_down_projection,
    input_ranges,
    is_quantized,
    resolve_precision,
)


def test_bad_combinations_are_refused():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("int8", cpu) == "int8"
    assert resolve_precision("auto", gpu) == "fp16"  # as close to fp32 as bf16 is not (README, GPU)
    with pytest.raises(OptionError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(OptionError, match="int8 is for CPUs"):
        resolve_precision("int8", gpu)
    assert resolve_precision("bf16", cpu) == "bf16"  # without bf16 units, --precision bf16 warns (test_autoprecision)


def test_int8_keeps_sensitive_layers_and_the_predictions(tuned_model_dir):
    model = AutoModelForTokenClassification.from_pretrained(tuned_model_dir).eval()
    tokenizer = load_tokenizer(str(tuned_model_dir))
    assert first_down_projection(model) == "bert.encoder.layer.0.output.dense"
    texts = ["Peter Blackburn of the European Commission said in Brussels on Monday that Germany agreed ."] * 3
    full, small = Tagger(model, tokenizer), Tagger(model, tokenizer, precision="int8")
    assert small.model is not model and type(model.classifier) is torch.nn.Linear  # the caller's model untouched
    assert type(small.model.classifier) is torch.nn.Linear  # kept in fp32
    assert isinstance(small.model.bert.encoder.layer[1].output.dense, DynamicLinear) and is_quantized(small.model)
    split = small.model.bert.encoder.layer[0].output.dense
    assert isinstance(split, OutlierSplitLinear) and isinstance(split.rest, DynamicLinear)
    ranges = input_ranges(model, "bert.encoder.layer.0.output.dense", calibration_batches(tokenizer))
    assert int(ranges.argmax()) in split.channels.tolist()  # the widest channel is computed in fp32
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
    recorded = json.loads(meta[b"nerbatch.options"])
    assert recorded["precision"] == "int8" and recorded["int8"] == INT8_SCHEME
    config = out / "_nerbatch" / "config.json"  # as written by 0.3.0, whose int8 was another scheme
    older = json.loads(config.read_text())
    del older["options"]["int8"]
    config.write_text(json.dumps(older))
    assert "different run" in CliRunner().invoke(main, args + ["--precision", "int8"]).output
    refused = CliRunner().invoke(main, args + ["--precision", "fp32"])
    assert refused.exit_code == 1 and "precision" in refused.output and "different run" in refused.output
    fp16 = CliRunner().invoke(main, args + ["--precision", "fp16", "--overwrite"])
    assert fp16.exit_code == 1 and "fp16 needs a GPU" in fp16.output and len(fp16.output.strip().splitlines()) == 1


def test_int8_records_its_batching_and_a_resume_with_another_is_refused(tuned_model_dir, tmp_path):
    """int8 spans depend on which windows share a batch (dynamic activation scales), so an int8 output
    records its batching and refuses a resume with another; fp32 spans do not, and fp32 resumes."""
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["Angela Merkel met Joe Biden in Berlin .", "It rained ."]}), source)
    for precision in ("int8", "fp32"):
        out = tmp_path / precision
        args = ["annotate", str(tuned_model_dir), str(source), "--output", str(out), "--id-column", "id"]
        args += ["--no-progress", "--precision", precision]
        assert CliRunner().invoke(main, args).exit_code == 0
        recorded = json.loads(pq.read_metadata(next(out.glob("part-*.parquet"))).metadata[b"nerbatch.options"])
        rerun = CliRunner().invoke(main, args + ["--max-batch-tokens", "64"])
        if precision == "int8":
            assert (recorded["batch_size"], recorded["max_batch_tokens"], recorded["read_rows"]) == (64, 1024, 512)
            assert rerun.exit_code == 1 and "different run" in rerun.output and "max_batch_tokens" in rerun.output
        else:
            assert "max_batch_tokens" not in recorded and rerun.exit_code == 0, rerun.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao's dynamic quantization; it still works
def test_outlier_split_keeps_the_other_channels_precise():
    """One input channel with 20x the range of the rest: plain dynamic int8 gives every channel that
    channel's step; computing it apart in fp32 keeps the int8 error of the others small."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64)
    x = torch.randn(128, 256)
    x[:, 17] *= 20.0
    ranges = x.abs().amax(0)
    exact = linear(x).detach()

    def int8(module):
        return quantize_dynamic(
            torch.nn.Sequential(module),
            {"0": per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            mapping={torch.nn.Linear: _FullRangeLinear},
        )

    plain, split = int8(linear), int8(OutlierSplitLinear(linear, ranges, k=4))
    assert 17 in split[0].channels.tolist() and isinstance(split[0].rest, DynamicLinear)
    plain_error, split_error = ((m(x) - exact).abs().mean() for m in (plain, split))
    assert split_error < plain_error / 4, f"mean error: plain int8 {plain_error:.5f}, split {split_error:.5f}"


class OverflowsUnderAutocast(torch.nn.Module):
    """A token classifier whose logits overflow (inf) in the batches `bad` picks, under autocast only."""

    def __init__(self, model, bad):
        super().__init__()
        self.inner, self.bad, self.config = model, bad, model.config

    def forward(self, input_ids, attention_mask, **kwargs):
        output = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if torch.is_autocast_enabled("cpu") and self.bad(input_ids):
            output.logits = output.logits.masked_fill(attention_mask[..., None].bool(), float("inf"))
        return output


def test_an_autocast_batch_that_overflows_runs_again_in_fp32(tuned_model_dir):
    """fp16's range ends at 65,504: a batch whose outputs are not finite is rerun in fp32 and counted,
    the others keep their autocast result (CPU bf16 autocast stands in for the GPU's fp16 here)."""
    model = AutoModelForTokenClassification.from_pretrained(tuned_model_dir).eval()
    tokenizer = load_tokenizer(str(tuned_model_dir))
    texts = [
        "Peter Blackburn of the European Commission said in Brussels on Monday that Germany agreed .",
        "Japan beat Syria 2-1 in Abu Dhabi .",
    ] * 4
    exact = Tagger(model, tokenizer, precision="fp32", batch_size=2).annotate(texts)
    for bad, expected in ((lambda ids: True, 4), (lambda ids: ids.shape[1] > 20, 2), (lambda ids: False, 0)):
        tagger = Tagger(OverflowsUnderAutocast(model, bad), tokenizer, precision="fp32", batch_size=2)
        tagger.autocast_dtype = torch.bfloat16
        spans = tagger.annotate(texts)
        assert tagger.fp32_batches == expected
        assert [[(s.start, s.end, s.label) for s in doc] for doc in spans] == [
            [(s.start, s.end, s.label) for s in doc] for doc in exact
        ]
        assert sum(map(len, spans)) > 0

    wrapped = AutocastWithFallback(OverflowsUnderAutocast(model, lambda ids: ids.shape[0] > 1), torch.bfloat16)
    batch = tokenizer(texts[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        reference = model(**batch).logits
        assert torch.equal(wrapped(**batch).logits, reference) and wrapped.fallbacks == 1  # rerun in fp32
        one = tokenizer(texts[:1], return_tensors="pt")
        assert wrapped(**one).logits.isfinite().all() and wrapped.fallbacks == 1  # kept its bf16 result


def test_the_fp32_rerun_is_fp32_inside_a_callers_autocast_and_never_silently_wrong(tuned_model_dir):
    """Inside a training loop's (or a user's) autocast block the rerun still runs in fp32; outputs
    that are not finite even in fp32 (broken weights) are an error, not label 0 everywhere."""
    from nerbatch.errors import NerbatchError
    from nerbatch.modeling import ModelError

    model = AutoModelForTokenClassification.from_pretrained(tuned_model_dir).eval()
    tokenizer = load_tokenizer(str(tuned_model_dir))
    texts = ["Peter Blackburn of the European Commission said in Brussels on Monday that Germany agreed ."]
    exact = Tagger(model, tokenizer, precision="fp32").annotate(texts)
    tagger = Tagger(OverflowsUnderAutocast(model, lambda ids: True), tokenizer, precision="fp32")
    tagger.autocast_dtype = torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tagger.annotate(texts) == exact and tagger.fp32_batches == 1
    batch = tokenizer(texts, return_tensors="pt")
    wrapped = AutocastWithFallback(OverflowsUnderAutocast(model, lambda ids: True), torch.bfloat16)
    with torch.inference_mode():
        reference = model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(wrapped(**batch).logits, reference)

    broken = AutoModelForTokenClassification.from_pretrained(tuned_model_dir).eval()
    with torch.no_grad():
        broken.classifier.bias.fill_(float("nan"))
    tagger = Tagger(broken, tokenizer, precision="fp32")
    tagger.autocast_dtype = torch.bfloat16
    with pytest.raises(ModelError, match="not finite even in fp32"):
        tagger.annotate(texts)
    with pytest.raises(NerbatchError, match="not finite even in fp32"), torch.inference_mode():
        AutocastWithFallback(broken, torch.bfloat16)(**batch)


def test_the_annotate_job_counts_overflowing_batches_in_its_stats_and_log(tuned_model_dir, tmp_path, monkeypatch):
    """The reruns reach the unit's done marker, the run totals and the command's log line."""
    import nerbatch.engines.ranks

    source = tmp_path / "docs.parquet"
    texts = ["Angela Merkel met Joe Biden in Berlin .", "It rained .", "Japan beat Syria 2-1 in Abu Dhabi ."]
    pq.write_table(pa.table({"id": [1, 2, 3], "text": texts}), source)
    load = nerbatch.engines.ranks.load_tagger

    def overflowing(options, device=None, choice=None):
        tagger = load(options, device, choice)
        tagger.model = OverflowsUnderAutocast(tagger.model, lambda ids: True)
        tagger.autocast_dtype = torch.bfloat16  # stands in for the GPU's fp16
        return tagger

    monkeypatch.setattr(nerbatch.engines.ranks, "load_tagger", overflowing)
    out = tmp_path / "out"
    args = ["annotate", str(tuned_model_dir), str(source), "--output", str(out), "--id-column", "id", "--no-progress"]
    done = CliRunner().invoke(main, [*args, "--batch-size", "2"])
    assert done.exit_code == 0, done.output
    assert "3 rows" in done.output and "2 batches overflowed fp16 and ran again in fp32" in done.output
    (marker,) = (out / "_nerbatch" / "done").glob("*.json")
    assert json.loads(marker.read_text())["fp32_batches"] == 2
    assert json.loads((out / "_nerbatch" / "stats.json").read_text())["fp32_batches"] == 2
    assert sum(len(e) for e in pq.read_table(out).column("entities").to_pylist()) > 0
