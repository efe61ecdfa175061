"""nerbatch on a CUDA device: where the model goes, what precision runs, the refusals, the gathers.

Run by `python -m benchmarks.gpu.gpu_bench` (the `tests` step), which sets:

    NERBATCH_GPU_DEVICE   cuda (or cpu in a dry run: the same code paths on the CPU)
    NERBATCH_GPU_MODEL    a fine-tuned token classifier with fp32 weights
    NERBATCH_GPU_REUTERS  Parquet with `doc_id` and `text`
    NERBATCH_GPU_VALID    a CoNLL file
    NERBATCH_GPU_DOCS     how many Reuters documents the span comparisons use

Without them every test skips: this file is not part of `make test` (which collects tests/ only).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

SETTINGS = ("NERBATCH_GPU_DEVICE", "NERBATCH_GPU_MODEL", "NERBATCH_GPU_REUTERS", "NERBATCH_GPU_VALID")
# What each device refuses, and the message's start: a one-line error, no traceback.
REFUSED = {"cuda": ("int8", "--precision int8 is for CPUs"), "cpu": ("fp16", "--precision fp16 needs a GPU")}
SAME_SPANS = 0.99  # documents whose spans must be identical between fp32 and the default precision
SAME_WORDS = 0.995  # words labelled alike by the device in fp32 and by the CPU


@dataclass(frozen=True)
class Setup:
    device: str
    model: str
    reuters: str
    valid: str
    docs: int


@pytest.fixture(scope="module")
def setup() -> Setup:
    missing = [name for name in SETTINGS if not os.environ.get(name)]
    if missing:
        pytest.skip(f"run through benchmarks/gpu/run.sh ({', '.join(missing)} not set)")
    device = os.environ["NERBATCH_GPU_DEVICE"]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return Setup(device, *(os.environ[name] for name in SETTINGS[1:]), int(os.environ.get("NERBATCH_GPU_DOCS", "100")))


@pytest.fixture(scope="module")
def texts(setup) -> list[str]:
    """The first non-blank Reuters texts, of any length."""
    column = pq.read_table(setup.reuters, columns=["text"]).column("text").to_pylist()
    return [t for t in column if t and t.strip()][: setup.docs]


@pytest.fixture(scope="module")
def corpus(texts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.parquet"
    pq.write_table(pa.table({"doc_id": list(range(len(texts))), "text": texts}), path)
    return path


@pytest.fixture(scope="module")
def loaded(setup):
    """(model, tokenizer) of the fine-tuned model, on the CPU."""
    from nerbatch.modeling import load_token_classifier

    return load_token_classifier(setup.model)


def default_precision(device: str) -> str:
    """What `--precision auto` must become on `device`."""
    return "fp16" if device == "cuda" else "fp32"


def annotate_process(setup: Setup, corpus: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """`python -m nerbatch annotate` on the corpus as a real process (device chosen by the command)."""
    cmd = [sys.executable, "-m", "nerbatch", "annotate", setup.model, str(corpus), "--output", str(out)]
    return subprocess.run(
        [*cmd, "--id-column", "doc_id", "--no-progress", *options], capture_output=True, text=True, timeout=300
    )


def part_options(out: Path) -> dict:
    """The annotate options recorded in the output's Parquet metadata."""
    meta = pq.read_metadata(next(out.glob("*.parquet"))).metadata
    return json.loads(meta[b"nerbatch.options"])


def test_the_annotate_job_puts_the_model_on_the_device(setup, corpus, texts, tmp_path):
    from nerbatch.engines.ranks import annotate_units
    from nerbatch.job import load_tagger
    from nerbatch.options import Options

    options = Options(
        model=setup.model, inputs=[str(corpus)], output=tmp_path / "out", id_column="doc_id", progress=False
    )
    tagger = load_tagger(options, setup.device)
    assert tagger.device.type == setup.device
    assert {p.device.type for p in tagger.model.parameters()} == {setup.device}
    assert tagger.precision == default_precision(setup.device)
    assert tagger.batch_size == (1024 if setup.device == "cuda" else 64)  # the window cap of each device
    tally = annotate_units(options, device=setup.device)
    assert tally.rows == len(texts) and tally.entities > 0
    assert pq.read_table(options.output).num_rows == len(texts)
    assert part_options(options.output)["precision"] == default_precision(setup.device)


def test_the_command_line_runs_on_the_device_by_default(setup, corpus, texts, tmp_path):
    done = annotate_process(setup, corpus, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"rank 0: {len(texts)} rows" in done.stderr
    # auto is fp32 on a CPU: fp16 in the output's metadata means the job ran on the GPU
    assert part_options(tmp_path / "out")["precision"] == default_precision(setup.device)


def test_several_processes_share_one_device(setup, texts, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on one GPU: both ranks run their units there
    (the job's group is gloo: NCCL refuses two ranks on one device) and every row comes out once."""
    from benchmarks.gpu.gpu_bench import free_port
    from nerbatch.dist import launch_command

    corpus = tmp_path / "two-units.parquet"
    pq.write_table(pa.table({"doc_id": list(range(len(texts))), "text": texts}), corpus, row_group_size=len(texts) // 2)
    cmd = [*launch_command(2, free_port()), "-m", "nerbatch", "annotate", setup.model, str(corpus), "--output"]
    cmd += [str(tmp_path / "out"), "--id-column", "doc_id", "--no-progress"]
    one = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # both on one GPU, however many there are
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": one} if setup.device == "cuda" else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0:" in done.stderr and "rank 1:" in done.stderr
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_nerbatch" / "done").glob("*.json")]
    assert {m["rank"] for m in markers} == {0, 1}
    assert sorted(pq.read_table(tmp_path / "out").column("doc_id").to_pylist()) == list(range(len(texts)))
    assert part_options(tmp_path / "out")["precision"] == default_precision(setup.device)


def test_the_default_precision_keeps_the_fp32_spans(setup, loaded, texts):
    from nerbatch.inference import tag_texts

    model, tokenizer = loaded
    model = copy.deepcopy(model).to(setup.device)
    exact = tag_texts(texts, model, tokenizer, precision="fp32")
    default = tag_texts(texts, model, tokenizer, precision="auto")
    keys = [[[(s.start, s.end, s.label) for s in doc] for doc in run] for run in (exact, default)]
    same = np.mean([a == b for a, b in zip(*keys)])
    assert sum(map(len, keys[0])) > 0, "no entities at all: the comparison would be empty"
    assert same >= SAME_SPANS, f"only {same:.1%} of {len(texts)} documents keep their fp32 spans"


def test_a_precision_the_device_cannot_run_is_a_one_line_error(setup, corpus, tmp_path):
    precision, message = REFUSED[setup.device]
    done = annotate_process(setup, corpus, tmp_path / "out", "--precision", precision)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: {message}"), done.stderr[-3000:]


def test_padding_and_gathering_on_the_device_keep_every_word(setup, loaded):
    from transformers import DataCollatorForTokenClassification

    from nerbatch.data import read_conll
    from nerbatch.dist import make_accelerator
    from nerbatch.evaluation import eval_loader, predict_word_labels
    from nerbatch.modeling import max_model_length

    model, tokenizer = loaded
    accelerator = make_accelerator()
    assert accelerator.device.type == setup.device and accelerator.num_processes == 1
    rows = torch.arange(6, device=accelerator.device).reshape(2, 3)
    gathered = accelerator.gather_for_metrics(accelerator.pad_across_processes(rows, dim=1, pad_index=-100))
    assert gathered.device.type == setup.device and torch.equal(gathered.cpu(), rows.cpu())

    sentences = read_conll(setup.valid).sentences
    label2id = {label: int(i) for label, i in model.config.label2id.items()}
    collator = DataCollatorForTokenClassification(tokenizer)

    def word_labels(on_device: bool) -> list[list[int]]:
        encoded, loader = eval_loader(
            tokenizer, sentences, label2id, max_model_length(tokenizer, model.config), collator, 16
        )
        if on_device:  # the sharded loader and the model on the device, as `evaluate` runs them
            return predict_word_labels(
                accelerator, copy.deepcopy(model).to(accelerator.device), accelerator.prepare(loader), encoded.features
            )
        return predict_word_labels(accelerator, model, loader, encoded.features)

    device, cpu = word_labels(True), word_labels(False)
    assert [len(s) for s in device] == [len(s) for s in cpu]
    assert sum(map(len, device)) == sum(len(s.words) for s in sentences)  # every word, once
    agree = np.mean([a == b for x, y in zip(device, cpu) for a, b in zip(x, y)])
    assert agree >= SAME_WORDS, f"the device labels only {agree:.2%} of the words as the CPU does"
