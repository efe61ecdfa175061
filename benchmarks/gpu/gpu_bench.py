"""The GPU benchmark: CUDA tests, annotation and training speed, CPU-vs-GPU spans, one JSON file.

    OUT=DIR benchmarks/gpu/run.sh [--dry-run]      (sets the environment, then runs this module)

Built to be right the first time it meets a GPU: one H100/H200 is lent for minutes, offline, with
the repository and the carry folder made by `prepare.py`. The runner (`benchmarks.gpu.runner`) runs
these steps in this order, each in its own process, under one time budget (480 s by default):

    assets         models and data in a scratch folder: the carried MiniLM with fp32 weights again,
                   and a randomly initialised token classifier shaped like bert-base-cased
    tests          benchmarks/gpu/test_cuda.py under pytest, on the device
    cpu_gpu_spans  the MiniLM's spans on the CPU in fp32 vs on the device at annotate's default precision
    annotation     `nerbatch annotate` vs the transformers pipeline vs the forward-only ceiling, per model
    training       `nerbatch train` (batch 32, length-grouped, fp32 and bf16) vs the reference loop (fp32, batch 8)

A step records its results in a JSON file as it goes, so a step that fails or runs out of time keeps
what it measured and says why in an `error`; the later steps still run. One process per step, because
a CUDA error leaves the process that met it unusable. OUT/gpu.json is rewritten after every step.

`--dry-run` runs every step at tiny sizes on the CPU (CUDA hidden): a tiny BERT instead of the
bert-base shape, a few training steps and documents. Without a carry folder it builds what it needs
the way the test fixtures do (tests/conftest.py), from ../shared/data or $NERBATCH_SHARED_DATA.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu.runner import (
    REPO,
    Benchmark,
    CommandFailed,
    Context,
    child_env,
    describe_error,
    dig,
    main,
    nested_errors,
    run_logged,
)

HERE = Path(__file__).resolve().parent
CARRY = HERE / "carry"
MANIFEST = "manifest.json"  # written last by prepare.py: a carry folder without it is incomplete
SHARED_DATA = Path(os.environ.get("NERBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))

# Share of subwords the random model tags as entities. A random head tags about 8 in 9, which would
# make span decoding and the output cost far more than with any trained model. The carried MiniLM
# finds 4.6 spans per 100 Reuters subwords (it tags 12.6% of them, but its entities run over several
# subwords; a random head's tagged subwords rarely join): tagging 5% gives about as many spans.
ENTITY_SHARE = 0.05
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@dataclass(frozen=True)
class Sizes:
    """How much work each step does. The GPU sizes fit the budget on one H100/H200 with room to spare;
    the dry-run sizes only prove the code paths, on a 2-core CPU."""

    encoder: dict  # BertConfig shape of the randomly initialised model (training, annotation)
    test_docs: int  # Reuters documents in the CUDA tests' span comparisons
    span_docs: int  # documents of the CPU-vs-GPU span check
    train_sentences: int  # CoNLL sentences each training loop runs through, once
    eval_sentences: int  # validation sentences (untimed; kept small)
    pool_docs: int  # Reuters documents that fit one 512-subword window (the pipeline sees them whole)
    copies: int  # annotate's corpus: the pool this many times, one row group (one unit) each
    pipeline_docs: int  # the pipeline's share of the pool: it is much slower; rates compare per subword
    batch_sizes: tuple[int, ...]  # pipeline batch sizes
    repeats: int  # interleaved rounds of pipeline and ceiling; the best round counts
    budget_s: float  # all steps together
    tune_steps: int  # dry run without a carry folder: fine-tuning steps of the tiny BERT
    annotate_runs: dict  # model: the ANNOTATE_RUNS timed for it
    # other settings `nerbatch train` is timed with, last: (name, batch size, accelerate mixed precision)
    train_probes: tuple[tuple[str, int, str], ...] = ()
    train_profile: bool = True  # profile the training step (profile_training)
    annotate_profile: tuple[str, ...] = ("bert_base_random",)  # models whose annotate job is profiled
    steps: tuple[str, ...] = ()  # the steps to run (assets always runs); empty: all
    tests: str = ""  # a pytest -k expression choosing the CUDA tests; empty: all


GPU_SIZES = Sizes(
    encoder=BERT_BASE,
    test_docs=300,
    span_docs=300,
    train_sentences=9600,
    eval_sentences=64,
    pool_docs=4000,
    copies=3,
    pipeline_docs=500,
    batch_sizes=(1, 8, 32, 64),
    repeats=2,
    budget_s=480,
    tune_steps=0,
    annotate_runs={
        "bert_base_random": (
            "like_pipeline",
            "like_pipeline_4proc",
            "defaults",
            "defaults_4proc",
            "like_pipeline_ray4",
        ),
        "minilm_tuned": ("like_pipeline",),
    },
    train_probes=(("bf16", 32, "bf16"),),
    # the H100 runs profiled one process (set `--set 'annotate_profile=["bert_base_random"]'` to profile again)
    annotate_profile=(),
)
DRY_SIZES = Sizes(
    encoder=TINY_BERT,
    test_docs=12,
    span_docs=16,
    train_sentences=96,
    eval_sentences=16,
    pool_docs=24,
    copies=2,
    pipeline_docs=12,
    batch_sizes=(1, 8),
    repeats=1,
    budget_s=240,
    tune_steps=100,
    annotate_runs={
        "bert_base_random": ("like_pipeline", "like_pipeline_2proc", "like_pipeline_ray2", "defaults"),
        "minilm_tuned": ("like_pipeline",),
    },
    train_probes=(("bf16", 32, "bf16"),),
)

# The `nerbatch annotate` runs Sizes.annotate_runs picks from: (extra options, extra environment).
# `like_pipeline` does the pipeline's work (one 512-subword window per document, subword-level
# aggregation), so the ratios use it; the others tell what the defaults, bigger batches (the ceiling
# has no 64-window cap; with the defaults' sentence windows too), a single-threaded tokenizer (0.3.3's
# second H200 run: 448k against 582k subwords/s, so no longer run) or bf16 (the default before 0.3.3). The
# tokenizer runs as users have it: the tokenizers library uses every core unless
# TOKENIZERS_PARALLELISM=false.
# `_Nproc` runs start N processes on the one GPU (`accelerate launch --multi_gpu --num_processes N`),
# each with its own share of the units: N Python processes do the CPU side (tokenizing, planning,
# decoding, writing) that one process does alone, under one GIL, in the other runs; but each holds a
# CUDA context, and contexts take turns on the GPU (H100: 4 processes 892k, 8 processes 903k
# subwords/s).
# `_rayN` runs are `--engine ray` with its defaults: on a GPU machine they should start N actors sharing
# the GPU (a quarter of it each; 4 cores each), on the dry run's CPU one actor per core; N sizes the
# corpus as for N processes. The machine needs Ray (`pip install ray`), or the run records the error.
LIKE_PIPELINE = ["--segment", "none", "--max-length", "512", "--aggregation", "simple"]
ANNOTATE_RUNS = {
    "like_pipeline_ray4": ([*LIKE_PIPELINE, "--engine", "ray"], {}),
    "like_pipeline_ray2": ([*LIKE_PIPELINE, "--engine", "ray"], {}),
    "like_pipeline": (LIKE_PIPELINE, {}),
    "like_pipeline_2proc": (LIKE_PIPELINE, {}),
    "like_pipeline_4proc": (LIKE_PIPELINE, {}),
    "like_pipeline_8proc": (LIKE_PIPELINE, {}),
    "big_batches": ([*LIKE_PIPELINE, "--batch-size", "512"], {}),
    "serial_tokenizer": (LIKE_PIPELINE, {"TOKENIZERS_PARALLELISM": "false"}),
    "bf16": ([*LIKE_PIPELINE, "--precision", "bf16"], {}),
    "defaults": ([], {}),
    "defaults_4proc": ([], {}),
    # one window per sentence: 64 windows of ~25 subwords made ~2k-token batches on a GPU (0.3.3's
    # default cap; 0.3.4's GPU default is 1024 windows)
    "defaults_big_batches": (["--batch-size", "1024"], {}),
}

# `nerbatch train`'s precision on the GPU, as launch/1gpu.yaml sets it: at CoNLL's short sentences a
# step is bound by launching kernels, and bf16 autocast launches a cast for every weight and
# activation it converts (H100, batch 32: 1,299 sentences/s in fp32 against 752 in bf16).
TRAIN_PRECISION = "no"


def run_processes(run: str) -> int:
    """How many annotate processes share the GPU in `run` (its `_Nproc` or `_rayN` suffix; 1 without)."""
    found = re.search(r"_(\d+)proc$|_ray(\d+)$", run)
    return int(found.group(1) or found.group(2)) if found else 1


# (name, where in the report, at least): what the GPU run is expected to show.
TARGETS = (
    ("annotate_over_pipeline_best", ("annotation", "bert_base_random", "ratios", "annotate_over_pipeline_best"), 10.0),
    ("annotate_over_ceiling", ("annotation", "bert_base_random", "ratios", "annotate_over_ceiling"), 0.8),
    ("annotate_subwords_per_s", ("annotation", "bert_base_random", "ratios", "annotate_subwords_per_s"), 1_000_000),
    ("training_speedup", ("training", "speedup"), 3.0),
    ("cpu_gpu_identical_docs", ("cpu_gpu_spans", "fraction_identical"), 0.99),
)

# ---------------------------------------------------------------------------------------------- helpers


def rate(docs: int, subwords: int, seconds: float) -> dict:
    """Throughput figures of one timed run."""
    return {
        "docs": docs,
        "subwords": subwords,
        "seconds": seconds,
        "docs_per_s": docs / seconds,
        "subwords_per_s": subwords / seconds,
    }


def content_subwords(tokenizer, texts: list[str]) -> int:
    """Subwords of `texts` without special tokens: what annotate's stats count as tokens."""
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def reuters_texts(path: str, count: int) -> list[str]:
    """The first `count` non-blank texts of a Reuters Parquet file, of any length."""
    import pyarrow.parquet as pq

    texts = [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t and t.strip()]
    return texts[:count]


def model_shape(model) -> str:
    c = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return (
        f"{type(model).__name__}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
        f"heads, FFN {c.intermediate_size}, vocab {c.vocab_size}, {parameters / 1e6:.1f}M parameters"
    )


# ------------------------------------------------------------------------------------------------ assets


def step_assets(ctx: Context) -> None:
    """Models and data in the scratch folder: from the carry folder, or (dry run without one) built
    like the test fixtures from the shared data. Records their paths for the other steps."""
    tuned = ctx.workdir / "minilm-tuned"
    if (ctx.carry / MANIFEST).exists():
        restore_fp32(ctx.carry / "minilm", tuned)
        conll, reuters = ctx.carry / "conll2003", ctx.carry / "reuters.parquet"
        source = f"carry folder {ctx.carry}"
    elif ctx.dry_run:
        conll, reuters = SHARED_DATA / "conll2003", SHARED_DATA / "reuters21578" / "reuters21578.parquet"
        if not (conll / "train.txt").exists() or not reuters.exists():
            raise FileNotFoundError(f"no carry folder and no shared data at {SHARED_DATA} (set NERBATCH_SHARED_DATA)")
        build_tuned_tiny_bert(tuned, ctx.sizes.tune_steps)
        source = f"tiny BERT fine-tuned here, shared data {SHARED_DATA}"
    else:
        raise FileNotFoundError(
            f"no {ctx.carry / MANIFEST}: run benchmarks/gpu/prepare.py and carry benchmarks/gpu/carry (README)"
        )
    sample = reuters_texts(str(reuters), 16)
    encoder = build_random_encoder(tuned, ctx.workdir / "bert-base-random", ctx.sizes.encoder, sample)
    valid = head_conll(conll / "valid.txt", ctx.workdir / "valid-head.txt", ctx.sizes.eval_sentences)
    ctx.result.update(
        source=source,
        models={"minilm_tuned": str(tuned), "bert_base_random": str(encoder)},
        conll_train=str(conll / "train.txt"),
        conll_valid=str(valid),
        reuters=str(reuters),
    )


def restore_fp32(carried: Path, target: Path) -> None:
    """Save the carried bf16 checkpoint with fp32 weights: transformers loads a checkpoint in the
    dtype it was saved in, and nerbatch's fp32 paths (CPU, `--precision fp32`) expect fp32 weights."""
    import torch
    from transformers import AutoModelForTokenClassification

    AutoModelForTokenClassification.from_pretrained(carried, dtype=torch.float32).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (carried / name).exists():
            shutil.copy(carried / name, target / name)


def build_tuned_tiny_bert(target: Path, steps: int) -> None:
    """The test suite's tiny BERT (WordPiece trained on the shared data), briefly fine-tuned on CoNLL,
    with MiniLM's 512 positions (the annotate runs ask for 512-subword windows)."""
    from tests.models import build_tiny_model, fine_tune

    with tempfile.TemporaryDirectory() as base:
        fine_tune(build_tiny_model(Path(base), max_positions=512), target, steps)


def build_random_encoder(tokenizer_dir: Path, target: Path, shape: dict, sample: list[str]) -> Path:
    """A randomly initialised BERT token classifier of `shape` with the tokenizer and the labels of
    the model in `tokenizer_dir`, tagging about as many subwords of `sample` as a trained model: its
    speed is that of a real one; its spans mean nothing."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForTokenClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    labels = AutoConfig.from_pretrained(tokenizer_dir).id2label
    config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        id2label=labels,
        label2id={label: i for i, label in labels.items()},
        **shape,
    )
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    calibrate_entity_share(model, tokenizer, sample, ENTITY_SHARE)
    model.save_pretrained(target)
    tokenizer.model_max_length = config.max_position_embeddings  # this model's limit, not the source's
    tokenizer.save_pretrained(target)
    return target


def calibrate_entity_share(model, tokenizer, texts: list[str], share: float) -> None:
    """Raise the classifier's `O` bias so that `share` of the subwords of `texts` get another label."""
    import torch

    outside = model.config.label2id["O"]
    with torch.inference_mode():
        batch = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
        logits = model(**batch).logits[batch["attention_mask"].bool()]
    others = torch.cat([logits[:, :outside], logits[:, outside + 1 :]], dim=1).max(dim=1).values
    margin = others - logits[:, outside]  # a subword is tagged where this exceeds the added bias
    model.classifier.bias.data[outside] += torch.quantile(margin, 1 - share)


def head_conll(source: Path, target: Path, sentences: int) -> Path:
    """The first `sentences` sentences of a CoNLL file, with its -DOCSTART- lines."""
    kept, count = [], 0
    for block in re.split(r"\n\s*\n", source.read_text(encoding="utf-8")):
        if count == sentences:
            break
        if block.strip():
            kept.append(block.strip("\n"))
            count += not block.startswith("-DOCSTART-")
    target.write_text("\n\n".join(kept) + "\n\n", encoding="utf-8")
    return target


# ------------------------------------------------------------------------------------------------- tests


def step_tests(ctx: Context) -> None:
    """benchmarks/gpu/test_cuda.py under pytest on the device; counts and each test's outcome."""
    assets = ctx.assets()
    xml = ctx.out / "tests.xml"
    settings = {
        "NERBATCH_GPU_DEVICE": ctx.device,
        "NERBATCH_GPU_MODEL": assets["models"]["minilm_tuned"],
        "NERBATCH_GPU_REUTERS": assets["reuters"],
        "NERBATCH_GPU_VALID": assets["conll_valid"],
        "NERBATCH_GPU_DOCS": str(ctx.sizes.test_docs),
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_cuda.py")]
    cmd += ["-k", ctx.sizes.tests] if ctx.sizes.tests else []
    timeout = ctx.remaining()
    try:
        done = subprocess.run([*cmd, f"--junitxml={xml}"], env=child_env(**settings), cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"pytest stopped after {timeout:.0f} s (time budget)") from exc
    ctx.result.update(device=ctx.device, exit_code=done.returncode, **junit_outcomes(xml))
    if ctx.result["failed"] or not ctx.result["passed"]:
        failing = [c["name"] for c in ctx.result["cases"] if c["outcome"] == "failed"]
        ctx.result["error"] = f"{ctx.result['failed']} failed ({', '.join(failing)}), {ctx.result['passed']} passed"


def junit_outcomes(xml: Path) -> dict:
    """passed / failed (failures and errors) / skipped counts and every test case from pytest's JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    outcomes = {"failure": "failed", "error": "failed", "skipped": "skipped"}
    cases = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        found = next((case.find(tag) for tag in outcomes if case.find(tag) is not None), None)
        entry = {"name": case.get("name"), "seconds": float(case.get("time", 0)), "outcome": "passed"}
        if found is not None:
            entry |= {"outcome": outcomes[found.tag], "message": (found.get("message") or "")[:500]}
        cases.append(entry)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")}
    return {**counts, "cases": cases}


# ----------------------------------------------------------------------------------------- cpu_gpu_spans


def step_cpu_gpu_spans(ctx: Context) -> None:
    """The tuned model's spans on the CPU in fp32 against the device at annotate's default precision
    (fp16 on a GPU since 0.3.3): documents whose (start, end, label) spans are identical, and examples
    that differ.
    `by_precision`: the same comparison for each precision the device offers (bf16 and fp32 too)."""
    from nerbatch.inference import Tagger
    from nerbatch.modeling import load_token_classifier

    assets = ctx.assets()
    texts = reuters_texts(assets["reuters"], ctx.sizes.span_docs)
    cpu_model, tokenizer = load_token_classifier(assets["models"]["minilm_tuned"])
    device_model, _ = load_token_classifier(assets["models"]["minilm_tuned"])
    device_model.to(ctx.device)
    cpu = Tagger(cpu_model, tokenizer, precision="fp32")
    began = time.perf_counter()
    cpu_spans = cpu.annotate(texts)
    ctx.result.update(device=ctx.device, cpu_precision="fp32", cpu_seconds=time.perf_counter() - began)
    ctx.result["by_precision"] = {}
    for precision in DEVICE_PRECISIONS[ctx.device]:
        device = Tagger(device_model, tokenizer, precision=precision)
        device.annotate(texts[:8])  # warm-up: CUDA context and kernels
        began = time.perf_counter()
        device_spans = device.annotate(texts)
        found = {"precision": device.precision, "seconds": time.perf_counter() - began}
        found |= compare_spans(cpu_spans, device_spans)
        ctx.result["by_precision"][precision] = found
        if precision == "auto":  # the headline: annotate's default
            ctx.result.update(
                device_precision=device.precision,
                segment=device.segment,
                device_seconds=found["seconds"],
                **compare_spans(cpu_spans, device_spans),
            )
        ctx.save()


# The precisions the span check compares on each device, the default first.
DEVICE_PRECISIONS = {"cuda": ("auto", "bf16", "fp32"), "cpu": ("auto",)}


def compare_spans(cpu: list, device: list) -> dict:
    """Documents with identical spans, spans found by both, and the first differing documents."""
    pairs = [
        ([(s.start, s.end, s.label) for s in a], [(s.start, s.end, s.label) for s in b]) for a, b in zip(cpu, device)
    ]
    identical = sum(a == b for a, b in pairs)
    examples = [
        {"doc": i, "only_cpu": sorted(set(a) - set(b)), "only_device": sorted(set(b) - set(a))}
        for i, (a, b) in enumerate(pairs)
        if a != b
    ]
    return {
        "docs": len(pairs),
        "docs_identical": identical,
        "fraction_identical": identical / len(pairs),
        "spans_cpu": sum(len(a) for a, _ in pairs),
        "spans_device": sum(len(b) for _, b in pairs),
        "spans_in_both": sum(len(set(a) & set(b)) for a, b in pairs),
        "differing_examples": examples[:5],
    }


# -------------------------------------------------------------------------------------------- annotation


def step_annotation(ctx: Context) -> None:
    """Per model: `nerbatch annotate` runs as processes, then the pipeline and the ceiling in this one."""
    assets = ctx.assets()
    for name, runs in ctx.sizes.annotate_runs.items():
        entry = ctx.result[name] = {}
        try:
            annotate_model(ctx, entry, name, assets["models"][name], assets["reuters"], runs)
        except Exception as exc:
            traceback.print_exc()
            entry["error"] = describe_error(exc)
            ctx.say(f"{name}: FAILED: {entry['error'][:300]}")
        ctx.save()


def annotate_model(ctx: Context, entry: dict, name: str, model_dir: str, reuters: str, runs: tuple[str, ...]) -> None:
    """Fill `entry` with one model's annotate runs, pipeline, ceiling and their ratios, saving as it goes."""
    from benchmarks.common import load_documents
    from nerbatch.modeling import load_token_classifier, max_model_length

    model, tokenizer = load_token_classifier(model_dir, transformers_only=True)  # the pipeline runs it
    pool = load_documents(Path(reuters), ctx.sizes.pool_docs, tokenizer, max_model_length(tokenizer, model.config))
    corpus = write_corpus(ctx.workdir / f"{name}-corpus.parquet", pool, ctx.sizes.copies)
    shared = {}  # N: the corpus of the runs where N processes do the CPU side, written once
    entry.update(
        model=model_shape(model),
        device=ctx.device,
        pool_docs=len(pool),
        pool_subwords=content_subwords(tokenizer, pool),
        copies=ctx.sizes.copies,
        annotate={},
    )
    ctx.save()
    for run in runs:
        entry["annotate"][run] = ctx.attempt(
            f"{name}: annotate {run}",
            time_annotate,
            ctx,
            name,
            model_dir,
            corpus_for(ctx, corpus, pool, run, shared),
            run,
        )
        ctx.save()
    if name in ctx.sizes.annotate_profile:
        entry["profile"] = ctx.attempt(f"{name}: annotate profile", profile_annotate, ctx, model_dir, corpus)
        ctx.save()
    model.to(ctx.device)
    entry.update(ctx.attempt(f"{name}: pipeline and ceiling", time_pipeline_and_ceiling, ctx, model, tokenizer, pool))
    if "pipeline" in entry and "subwords_per_s" in entry["annotate"].get("like_pipeline", {}).get("steady", {}):
        entry["ratios"] = annotation_ratios(entry)  # from the runs that succeeded
    ctx.save()


def profile_annotate(ctx: Context, model_dir: str, corpus: Path, top: int = 25) -> dict:
    """Where one annotate process's main thread spends its time: the `like_pipeline` job run once to
    warm up, then again under cProfile, in this process (the tokenizing thread is not profiled;
    waiting for it shows as lock acquisition). Functions with the most own time and most time
    below them, per document."""
    import cProfile
    import pstats

    from nerbatch.engines.ranks import annotate_units
    from nerbatch.options import Options

    pipeline_like = dict(segment="none", max_length=512, aggregation="simple")
    options = Options(
        model=model_dir,
        inputs=[str(corpus)],
        output=str(ctx.workdir / "annotate-profile"),
        id_column="doc_id",
        progress=False,
        overwrite=True,
        **pipeline_like,
    )
    annotate_units(options, device=ctx.device)  # warm-up: kernels, allocator, imports
    profiler = cProfile.Profile()
    profiler.enable()
    tally = annotate_units(options, device=ctx.device)
    profiler.disable()
    shutil.rmtree(options.output)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own, cumulative, callers)}

    def rows(index: int) -> list[dict]:
        ranked = sorted(stats.items(), key=lambda item: -item[1][index])[:top]
        return [
            {
                "function": f"{Path(file).name}:{line}({name})",
                "calls": calls,
                "own_us_per_doc": own / tally.rows * 1e6,
                "cumulative_us_per_doc": cumulative / tally.rows * 1e6,
            }
            for (file, line, name), (_, calls, own, cumulative, _) in ranked
        ]

    return {"docs": tally.rows, "job_seconds": tally.seconds, "by_own_time": rows(2), "by_cumulative_time": rows(3)}


def write_corpus(path: Path, texts: list[str], copies: int, parts: int = 1) -> Path:
    """`copies` times the texts in one Parquet file (`doc_id`, `text`), `parts` row groups per copy:
    each is one annotate unit, so the units after the first show the job without its warm-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"doc_id": list(range(len(texts) * copies)), "text": texts * copies})
    pq.write_table(table, path, row_group_size=math.ceil(len(texts) / parts))
    return path


def corpus_for(ctx: Context, corpus: Path, pool: list[str], run: str, written: dict) -> Path:
    """The corpus `run` annotates: `corpus` for one process; for N sharing the GPU,
    N times as many copies of the pool in twice as many units, so each process gets as much work as
    one alone (written once per N, kept in `written`)."""
    processes = run_processes(run)
    if processes == 1:
        return corpus
    if processes not in written:
        path = corpus.with_name(f"{corpus.stem}-x{processes}.parquet")
        written[processes] = write_corpus(path, pool, ctx.sizes.copies * processes, parts=2)
    return written[processes]


def time_annotate(ctx: Context, name: str, model_dir: str, corpus: Path, run: str) -> dict:
    """One `nerbatch annotate` job (N processes for an `_Nproc` run, on `corpus_for`'s corpus): the
    whole job timed; the job's own time (the busiest rank's units); and the steady state (done
    markers), while every rank is past its first unit, which holds the start-up and warm-up."""
    from nerbatch.dist import launch_command

    options, env = ANNOTATE_RUNS[run]
    processes = run_processes(run)
    output = ctx.workdir / f"annotate-{name}-{run}"
    ray = "ray" in options
    launcher = [*launch_command(processes, free_port()), "-m"] if processes > 1 and not ray else [sys.executable, "-m"]
    cmd = [*launcher, "nerbatch", "annotate", model_dir, str(corpus), "--output", str(output)]
    cmd += ["--id-column", "doc_id", "--no-progress", "--overwrite", *options]
    if processes > 1 and ctx.device == "cuda" and not ray:
        env = {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}  # one GPU
    process = run_logged(cmd, ctx.out / "logs" / f"annotate-{name}-{run}.log", ctx.remaining(), **env)
    stats = json.loads((output / "_nerbatch" / "stats.json").read_text())
    markers = [json.loads(p.read_text()) for p in (output / "_nerbatch" / "done").glob("*.json")]
    shutil.rmtree(output)
    busiest = max(sum(m["seconds"] for m in markers if m["rank"] == r) for r in {m["rank"] for m in markers})
    return {
        "options": options,
        "env": env,
        "processes": len({(m["rank"], m.get("pid")) for m in markers}) if ray else processes,
        "settings": stats["options"],
        "entities": stats["entities"],
        "windows": stats["windows"],
        **rate(stats["docs"], stats["tokens"], busiest),
        "steady": steady_rate(markers) if len(markers) > run_processes(run) else {"error": "one unit per process"},
        "process_seconds": process,
        "process_docs_per_s": stats["docs"] / process,
        "process_subwords_per_s": stats["tokens"] / process,
    }


def steady_rate(markers: list[dict]) -> dict:
    """Throughput while every process (rank, or a rank's worker: the markers' `rank` and `pid`) is
    past its first unit and none has finished: from the last process's first unit done to the first
    process's last unit done. Each later unit counts for the share of its run inside that window (a
    unit's run: its `seconds` before its `at`). With one process, this is the units after the first.

    Workers take units as they come, so one that started late may do a single unit: the window is
    then taken over the processes that did several, and the single units count for their share of
    it too (`note` says so)."""
    processes = {}
    for marker in sorted(markers, key=lambda m: m["at"]):
        processes.setdefault((marker["rank"], marker.get("pid")), []).append(marker)
    window = steady_window(processes.values())
    counted = [done[1:] for done in processes.values()]
    note = {}
    if window is None:
        several = [done for done in processes.values() if len(done) > 1]
        window = steady_window(several) if len(several) < len(processes) else None
        if window is None:
            return {"error": "no moment when every process was past its first unit"}
        counted = [done[1:] if len(done) > 1 else done for done in processes.values()]
        note = {"note": f"{len(processes) - len(several)} process(es) did a single unit: window over the others"}
    start, end = window
    docs = subwords = 0.0
    for unit in (unit for units in counted for unit in units):
        inside = min(unit["at"], end) - max(unit["at"] - unit["seconds"], start)
        share = max(inside, 0.0) / unit["seconds"] if unit["seconds"] > 0 else float(start <= unit["at"] <= end)
        docs, subwords = docs + share * unit["docs"], subwords + share * unit["tokens"]
    return rate(round(docs), round(subwords), end - start) | note


def steady_window(processes) -> tuple[float, float] | None:
    """(last first unit done, first last unit done) over `processes` (each its markers in time
    order), or None when one finished before another was past its first unit."""
    processes = list(processes)
    if not processes:
        return None
    start, end = max(done[0]["at"] for done in processes), min(done[-1]["at"] for done in processes)
    return (start, end) if end > start else None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_pipeline_and_ceiling(ctx: Context, model, tokenizer, pool: list[str]) -> dict:
    """The transformers pipeline (fp32, its default) at each batch size on the first documents of the
    pool, and the forward-only ceiling on the whole pool at annotate's default precision, rounds
    interleaved; then the pipeline in bf16 at its best batch size, for comparison."""
    import copy

    import torch

    from benchmarks.bench import ceiling_runner, pipeline_runner
    from benchmarks.common import best_times
    from nerbatch.inference import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
    from nerbatch.precision import autocast_dtype, resolve_precision

    device = ctx.device
    precision = resolve_precision("auto", torch.device(device))
    texts = pool[: ctx.sizes.pipeline_docs]
    budget = GPU_BATCH_TOKENS if device == "cuda" else CPU_BATCH_TOKENS
    ceiling = ceiling_runner(model, tokenizer, pool, budget, device)
    methods = {"ceiling": under_autocast(ceiling, device, autocast_dtype(precision))}
    methods |= {size: pipeline_runner(model, tokenizer, texts, size, device) for size in ctx.sizes.batch_sizes}
    seconds, _ = best_times(methods, ctx.sizes.repeats)
    subwords = content_subwords(tokenizer, texts)
    by_size = {str(size): rate(len(texts), subwords, seconds[size]) for size in ctx.sizes.batch_sizes}
    best = max(by_size, key=lambda size: by_size[size]["docs_per_s"])
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_seconds, _ = best_times({"bf16": pipeline_runner(bf16_model, tokenizer, texts, int(best), device)}, 1)
    return {
        "pipeline": {
            "precision": "fp32 (the pipeline's default)",
            "by_batch_size": by_size,
            "best_batch_size": int(best),
            "best": by_size[best],
            "bf16_weights_at_best_batch_size": rate(len(texts), subwords, bf16_seconds["bf16"]),
        },
        "ceiling": {
            "precision": precision,
            "max_batch_tokens": budget,
            **rate(len(pool), content_subwords(tokenizer, pool), seconds["ceiling"]),
        },
    }


def under_autocast(fn, device: str, dtype):
    """`fn` run under the autocast annotate uses on `device` (none for fp32)."""
    import torch

    def run():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            return fn()

    return run


def annotation_ratios(entry: dict) -> dict:
    """annotate doing the pipeline's work (the fastest `like_pipeline` run: one process, or several
    sharing the GPU) over the pipeline's best batch size and over the ceiling, per subword (they ran
    on different numbers of the same documents). The pipeline and the ceiling are timed warm, so the
    main ratios use annotate's steady state; the others are there for the record."""
    runs = {
        run: found
        for run, found in entry["annotate"].items()
        if run.startswith("like_pipeline") and "subwords_per_s" in found.get("steady", {})
    }
    best = max(runs, key=lambda run: runs[run]["steady"]["subwords_per_s"])
    ours, alone = runs[best], runs["like_pipeline"]
    pipeline, ceiling = entry["pipeline"]["best"]["subwords_per_s"], entry["ceiling"]["subwords_per_s"]
    return {
        "basis": f"subwords/s; annotate = the {best} run ({ours['processes']} process(es)), steady state",
        "run": best,
        "annotate_subwords_per_s": ours["steady"]["subwords_per_s"],
        "annotate_over_pipeline_best": ours["steady"]["subwords_per_s"] / pipeline,
        "annotate_over_ceiling": ours["steady"]["subwords_per_s"] / ceiling,
        "one_process_over_pipeline_best": alone["steady"]["subwords_per_s"] / pipeline,
        "one_process_over_ceiling": alone["steady"]["subwords_per_s"] / ceiling,
        "in_job_annotate_over_pipeline_best": ours["subwords_per_s"] / pipeline,
        "in_job_annotate_over_ceiling": ours["subwords_per_s"] / ceiling,
        "process_annotate_over_pipeline_best": ours["process_subwords_per_s"] / pipeline,
    }


# ---------------------------------------------------------------------------------------------- training


def step_training(ctx: Context) -> None:
    """The randomly initialised encoder trained on the same CoNLL sentences, once by `nerbatch train`
    and once by the reference loop; sentences per second of the training loop alone."""
    assets = ctx.assets()
    model, train, valid = assets["models"]["bert_base_random"], assets["conll_train"], assets["conll_valid"]
    sentences = ctx.sizes.train_sentences
    ctx.result.update(device=ctx.device, sentences=sentences, model=ctx.sizes.encoder)
    ctx.result["nerbatch"] = ctx.attempt("nerbatch train", train_nerbatch, ctx, model, train, valid, sentences)
    ctx.save()
    ctx.result["reference"] = ctx.attempt("reference loop", train_reference, model, train, valid, sentences)
    if not nested_errors(ctx.result):
        ctx.result["speedup"] = ctx.result["nerbatch"]["sentences_per_s"] / ctx.result["reference"]["sentences_per_s"]
    ctx.save()
    if ctx.sizes.train_profile:
        ctx.result["profile"] = ctx.attempt("training profile", profile_training, ctx, model, train)
        ctx.save()
    # Is a step bound by launching its kernels (rate grows with the batch; fp32 launches fewer casts
    # than bf16 autocast) or by the GPU's arithmetic?
    for name, batch, precision in ctx.sizes.train_probes:
        ctx.result[f"nerbatch_{name}"] = ctx.attempt(
            f"nerbatch train, {name}", train_nerbatch, ctx, model, train, valid, sentences, batch, precision
        )
        ctx.save()


def profile_training(ctx: Context, model_dir: str, train_file: str, steps: int = 20) -> dict:
    """Where a training step's time goes, in this process: `nerbatch train`'s batches (batch 32,
    length-grouped, pinned), fused AdamW and linear schedule, under bf16 autocast and in plain fp32;
    ms per step of each, then one bf16 pass under torch.profiler (per step: kernels launched, GPU
    time, and the operators with the most CPU time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DataCollatorForTokenClassification, get_linear_schedule_with_warmup

    from nerbatch.align import encode
    from nerbatch.batching import make_loader
    from nerbatch.config import TrainConfig
    from nerbatch.data import build_label_list, read_conll
    from nerbatch.modeling import load_model, load_tokenizer
    from nerbatch.train import make_optimizer

    device = ctx.device
    corpus = read_conll(train_file)
    corpus.sentences = corpus.sentences[: 32 * (3 * steps + 20)]  # warm-ups, two timed runs, the profiled one
    tokenizer = load_tokenizer(model_dir)
    model, labels = load_model(model_dir, build_label_list(corpus))
    model.to(device).train()
    cfg = TrainConfig(lr=1e-4, weight_decay=0.01)
    encoded = encode(tokenizer, corpus.sentences, {label: i for i, label in enumerate(labels)}, 512)
    collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8)
    batches = iter(make_loader(encoded, collator, 32, 0, train=True, group=True))
    optimizer = make_optimizer(model, cfg)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10_000)

    def run(count: int, dtype) -> float:
        began = time.perf_counter()
        for _ in range(count):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - began) * 1000 / count

    run(10, torch.bfloat16)  # warm-up of each precision: kernel selection, allocator
    run(10, None)
    result = {"ms_per_step_bf16": run(steps, torch.bfloat16), "ms_per_step_fp32": run(steps, None)}
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device == "cuda" else [])]) as prof:
        run(steps, torch.bfloat16)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    by_cpu = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return result | {
        "profiled_steps": steps,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "gpu_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1000 / steps,
        "cpu_ops_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / steps,
        "top_cpu_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            }
            for e in by_cpu[:15]
        ],
    }


def train_nerbatch(
    ctx: Context, model: str, train: str, valid: str, sentences: int, batch: int = 32, precision: str = TRAIN_PRECISION
) -> dict:
    """One epoch of `nerbatch train` over `sentences` sentences with the offline recipe's settings and
    `precision` (accelerate's mixed precision), as a process; train_seconds is the loop's own time
    (metrics.json)."""
    output = ctx.workdir / f"train-nerbatch-{batch}-{precision}"
    cmd = [sys.executable, "-m", "nerbatch", "train", "--model", model, "--train", train, "--validation", valid]
    cmd += ["--output-dir", str(output), "--epochs", "1", "--batch-size", str(batch), "--lr", "1e-4"]
    cmd += ["--warmup-ratio", "0.06", "--weight-decay", "0.01", "--group-by-length", "--keep-checkpoints", "1"]
    cmd += ["--max-train-samples", str(sentences)]
    log = ctx.out / "logs" / f"train-nerbatch-{batch}-{precision}.log"
    process = run_logged(cmd, log, ctx.remaining(), ACCELERATE_MIXED_PRECISION=precision)
    epoch = json.loads((output / "metrics.json").read_text())["epochs"][0]
    shutil.rmtree(output)  # gigabytes of weights and optimizer state with the bert-base shape
    return {
        "settings": f"batch {batch}, AdamW 1e-4, 6% warm-up, length-grouped batches, mixed precision {precision}",
        "steps": math.ceil(sentences / batch),
        "train_seconds": epoch["train_seconds"],
        "sentences_per_s": sentences / epoch["train_seconds"],
        "process_seconds": process,
        "train_loss": epoch["train_loss"],
    }


def train_reference(model: str, train: str, valid: str, sentences: int) -> dict:
    """bench.py's copy of the reference recipe's loop (fp32, batch 8, shuffled) in this process."""
    from benchmarks.bench import reference_loop

    result = reference_loop(model, train, valid, sentences)
    return {
        "settings": "the reference recipe's loop: batch 8, AdamW 2e-5, shuffled, fp32",
        "steps": math.ceil(sentences / 8),
        "train_seconds": result["train_seconds"],
        "sentences_per_s": sentences / result["train_seconds"],
    }


# ------------------------------------------------------------------------------------------------ driver

# name: (step, most seconds it may take; the global budget may cut it shorter)
STEPS = {
    "assets": (step_assets, 90),
    "tests": (step_tests, 100),
    "cpu_gpu_spans": (step_cpu_gpu_spans, 60),
    "annotation": (step_annotation, 300),
    "training": (step_training, 200),
}
REPORT_ORDER = ("dry_run", "budget_s", "elapsed_s", "sizes", "machine", "assets", "tests", "training")
REPORT_ORDER += ("annotation", "cpu_gpu_spans", "targets")


def machine_info() -> dict:
    """GPU, CPU and library versions of this machine."""
    import accelerate
    import tokenizers
    import torch
    import transformers

    from benchmarks.common import machine

    info = machine() | {
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "tokenizers": tokenizers.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_bf16": torch.cuda.is_bf16_supported(),
        }
    return info


def print_summary(report: dict) -> None:
    """The headline figures and every error, short enough for the end of a device run's output."""
    lines = [f"gpu.json: dry_run={report['dry_run']}, {report['elapsed_s']:.0f} s, GPU {report['machine'].get('gpu')}"]
    tests = report.get("tests", {})
    lines.append(f"tests: {tests.get('passed')} passed, {tests.get('failed')} failed, {tests.get('skipped')} skipped")
    spans = report.get("cpu_gpu_spans", {})
    if "fraction_identical" in spans:
        lines.append(
            f"cpu_gpu_spans: {spans['docs_identical']}/{spans['docs']} documents identical "
            f"({spans['device_precision']} on {spans['device']} vs fp32 on the CPU)"
        )
    for precision, found in spans.get("by_precision", {}).items():
        if "fraction_identical" in found:
            lines.append(f"  {precision} ({found['precision']}): {found['docs_identical']}/{found['docs']} identical")
    for name in report["sizes"]["annotate_runs"]:
        entry = dig(report, ("annotation", name)) or {}
        for run, figures in entry.get("annotate", {}).items():
            if "subwords_per_s" in figures:
                lines.append(
                    f"{name} annotate {run}: {figures['steady']['subwords_per_s']:,.0f} subwords/s steady, "
                    f"{figures['subwords_per_s']:,.0f} in the job, {figures['process_subwords_per_s']:,.0f} whole "
                    f"process ({figures['docs_per_s']:,.0f} docs/s in the job)"
                )
        if "pipeline" in entry:
            best = entry["pipeline"]["best"]
            lines.append(
                f"{name} pipeline best (batch {entry['pipeline']['best_batch_size']}): {best['docs_per_s']:,.0f} "
                f"docs/s, {best['subwords_per_s']:,.0f} subwords/s; ceiling "
                f"{entry['ceiling']['subwords_per_s']:,.0f} subwords/s"
            )
    training = report.get("training", {})
    for loop in ("nerbatch", "reference", *(f"nerbatch_{probe[0]}" for probe in report["sizes"]["train_probes"])):
        if "sentences_per_s" in training.get(loop, {}):
            lines.append(f"training {loop}: {training[loop]['sentences_per_s']:,.1f} sentences/s")
    for name, target in report["targets"].items():
        value = "not measured" if target["value"] is None else f"{target['value']:,.3f}"
        lines.append(
            f"target {name}: {value} (at least {target['at_least']:,}) {'MET' if target['met'] else 'NOT MET'}"
        )
    for section in STEPS:
        for error in nested_errors(report.get(section, {}), section):
            lines.append(f"ERROR {error[:400]}")
    print("\n".join(lines), flush=True)


BENCHMARK = Benchmark(
    module="benchmarks.gpu.gpu_bench",
    description="GPU benchmark of nerbatch (see benchmarks/gpu/README.md); run it through run.sh.",
    steps=STEPS,
    sizes=GPU_SIZES,
    dry_sizes=DRY_SIZES,
    targets=TARGETS,
    report_order=REPORT_ORDER,
    machine_info=machine_info,
    print_summary=print_summary,
    carry=CARRY,
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
