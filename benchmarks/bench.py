"""The benchmark: side-by-side measurements in one run, on one machine, with one model.

    python -m benchmarks.bench --model MODEL_DIR --data ../shared/data   (or `make bench`)


1. annotation: the transformers pipeline (best of several batch sizes) vs `nerbatch annotate`
   (Parquet in, Parquet out) vs a forward-only ceiling (pre-tokenized, length-sorted batches), in
   this process, so that only the work is timed;
2. processes: the same comparison as users run it, whole processes from start to exit: a pipeline
   script (benchmarks/pipeline_job.py, each batch size) vs `nerbatch annotate` at fp32 and at int8;
3. precision: validation F1 at sentence and document level, fp32 vs int8;
4. training: a faithful copy of the reference loop vs `nerbatch train`, one epoch each;
5. memory: peak RSS of `nerbatch annotate` on a corpus and on ten copies of it, fp32 and int8.

Every figure printed comes from this run; the JSON file keeps them with the settings used.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import (
    best_times,
    load_documents,
    machine,
    peak_rss_mb,
    window_documents,
    write_documents,
)

HERE = Path(__file__).resolve().parent


def pipeline_runner(model, tokenizer, texts: list[str], batch_size: int, device):
    """`pipeline(aggregation_strategy="simple")` over the list of texts, warmed up."""
    from transformers import pipeline

    ner = pipeline(
        "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple", device=device
    )
    ner(texts[:4])
    return lambda: ner(texts, batch_size=batch_size)


def ceiling_runner(model, tokenizer, texts: list[str], max_batch_tokens: int, device):
    """The forward pass alone: texts tokenized up front, sorted by length, batched by a token budget."""
    import torch

    encoded = tokenizer(texts, truncation=True)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches, current = [], []
    for i in order:  # ascending lengths: the newest member is the longest, so padded size = len * count
        if current and len(encoded[i]) * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    tensors = []
    for batch in batches:
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        tensors.append({k: v.to(device) for k, v in padded.items()})

    @torch.inference_mode()
    def forward():
        return [model(**t).logits.argmax(-1).cpu() for t in tensors]

    forward()  # warm-up
    return forward


def annotate_runner(model_dir: str, texts: list[str], workdir: Path, aggregation: str = "simple"):
    """`nerbatch annotate` end to end in this process (Parquet in, Parquet out), warmed up; the
    runner returns the output rows in document order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nerbatch.cli import main

    source = workdir / "docs.parquet"
    pq.write_table(pa.table({"doc_id": list(range(len(texts))), "text": texts}), source)
    out = workdir / "annotated"
    # Whole documents in one window, as the pipeline runs them, so the spans can be compared one to one.
    args = [
        "annotate",
        model_dir,
        str(source),
        "--output",
        str(out),
        "--id-column",
        "doc_id",
        "--aggregation",
        aggregation,
        "--segment",
        "none",
        "--overwrite",
        "--no-progress",
    ]

    def run():
        main.main(args, standalone_mode=False)
        return out

    run()
    return run


def same_spans(pipeline_output: list[list[dict]], rows: list[dict]) -> int:
    """Number of documents whose (start, end, label) spans differ between pipeline and annotate."""
    differ = 0
    for theirs, row in zip(pipeline_output, rows):
        a = [(e["start"], e["end"], e["entity_group"]) for e in theirs]
        b = [(e["start"], e["end"], e["label"]) for e in row["entities"]]
        differ += a != b
    return differ


def run_annotation(model_dir: str, corpus: Path, docs: int, batch_sizes: list[int], repeats: int) -> dict:
    """Section 1: pipeline vs annotate vs ceiling on the same documents."""
    import pyarrow.parquet as pq
    import torch

    from nerbatch.inference import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
    from nerbatch.modeling import load_token_classifier, max_model_length

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_token_classifier(model_dir, transformers_only=True)  # the pipeline runs it
    model = model.to(device)
    texts = load_documents(corpus, docs, tokenizer, max_model_length(tokenizer, model.config))
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    budget = CPU_BATCH_TOKENS if device == "cpu" else GPU_BATCH_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        methods = {
            "annotate": annotate_runner(model_dir, texts, Path(tmp)),
            "ceiling": ceiling_runner(model, tokenizer, texts, budget, device),
        }
        methods |= {size: pipeline_runner(model, tokenizer, texts, size, device) for size in batch_sizes}
        seconds, outputs = best_times(methods, repeats)
        rows = pq.read_table(outputs["annotate"]).sort_by("doc_id").to_pylist()
    rate = {name: len(texts) / s for name, s in seconds.items()}
    pipeline_best = max(batch_sizes, key=rate.get)
    best = rate[pipeline_best]
    return {
        "docs": len(texts),
        "tokens": tokens,
        "device": device,
        "seconds": {str(k): v for k, v in seconds.items()},
        "pipeline_docs_per_s": {size: rate[size] for size in batch_sizes},
        "pipeline_best_batch_size": pipeline_best,
        "annotate_docs_per_s": rate["annotate"],
        "ceiling_docs_per_s": rate["ceiling"],
        "annotate_tokens_per_s": tokens / seconds["annotate"],
        "ceiling_tokens_per_s": tokens / seconds["ceiling"],
        "pipeline_best_tokens_per_s": tokens / seconds[pipeline_best],
        "annotate_over_pipeline": rate["annotate"] / best,
        "annotate_over_ceiling": rate["annotate"] / rate["ceiling"],
        "docs_with_different_spans": same_spans(outputs[pipeline_best], rows),
    }


def annotate_process(model_dir: str, source: Path, out: Path, precision: str):
    """A runner for `nerbatch annotate` as a whole process; it returns the seconds spent inside the
    job (the units' own time), so start-up is whole-process time minus that."""
    cmd = [sys.executable, "-m", "nerbatch", "annotate", model_dir, str(source), "--output", str(out)]
    cmd += ["--id-column", "doc_id", "--precision", precision, "--overwrite", "--no-progress"]

    def run() -> float:
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads((out / "_nerbatch" / "stats.json").read_text())["seconds"]

    return run


def pipeline_process(model_dir: str, source: Path, out: Path, batch_size: int):
    """A runner for the pipeline script (benchmarks/pipeline_job.py) as a whole process."""
    cmd = [sys.executable, str(HERE / "pipeline_job.py"), model_dir, str(source), str(out)]
    cmd += ["--batch-size", str(batch_size)]
    return lambda: subprocess.run(cmd, check=True, capture_output=True)


def run_processes(model_dir: str, corpus: Path, docs: int, batch_sizes: list[int], repeats: int) -> dict:
    """Section 2: whole processes, start-up and exit included, on one Parquet file of documents that
    fit one window (so the pipeline sees them whole): the pipeline script at each batch size vs
    `nerbatch annotate` at fp32 and int8, interleaved rounds, best round each."""
    texts, tokenizer = window_documents(model_dir, corpus, docs)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_documents(texts, Path(tmp) / "docs.parquet")
        methods = {
            f"pipeline batch {size}": pipeline_process(model_dir, source, Path(tmp) / f"p{size}.parquet", size)
            for size in batch_sizes
        }
        methods["annotate fp32"] = annotate_process(model_dir, source, Path(tmp) / "fp32", "fp32")
        methods["annotate int8"] = annotate_process(model_dir, source, Path(tmp) / "int8", "int8")
        seconds, outputs = best_times(methods, repeats)
    pipeline_best = min((f"pipeline batch {size}" for size in batch_sizes), key=seconds.get)
    return {
        "docs": len(texts),
        "tokens": sum(len(ids) for ids in tokenizer(texts)["input_ids"]),
        "seconds": seconds,
        "in_job_seconds": {name: outputs[name] for name in ("annotate fp32", "annotate int8")},
        "pipeline_best": pipeline_best,
        "fp32_over_pipeline": seconds[pipeline_best] / seconds["annotate fp32"],
        "int8_over_pipeline": seconds[pipeline_best] / seconds["annotate int8"],
        "int8_over_fp32": seconds["annotate fp32"] / seconds["annotate int8"],
    }


def evaluate_f1(model_dir: str, valid_file: str, documents: bool, precision: str) -> float:
    """Overall F1 from `nerbatch evaluate` (a whole process; its last line is the metrics JSON)."""
    cmd = [sys.executable, "-m", "nerbatch", "evaluate", model_dir, valid_file, "--precision", precision]
    done = subprocess.run(cmd + (["--documents"] if documents else []), check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["overall_f1"]


def run_precision(model_dir: str, conll: Path) -> dict:
    """Section 3: validation F1 at both levels, fp32 vs int8."""
    valid = str(conll / "valid.txt")
    f1 = {
        level: {p: evaluate_f1(model_dir, valid, level == "document", p) for p in ("fp32", "int8")}
        for level in ("sentence", "document")
    }
    return {"f1": f1, "int8_minus_fp32": {level: v["int8"] - v["fp32"] for level, v in f1.items()}}


def reference_loop(model_dir: str, train_file: str, valid_file: str, sentences: int, seed: int = 42) -> dict:
    """One epoch of the reference recipe's loop: batch 8, AdamW 2e-5, linear schedule, shuffled
    batches padded per batch, every subword labelled; then our word-level evaluation."""
    import torch
    from accelerate.utils import set_seed
    from transformers import DataCollatorForTokenClassification, get_scheduler

    from nerbatch.align import encode
    from nerbatch.data import build_label_list, read_conll
    from nerbatch.dist import make_accelerator
    from nerbatch.evaluation import eval_loader, evaluate_features
    from nerbatch.modeling import load_model, load_tokenizer

    accelerator = make_accelerator()
    set_seed(seed)
    train = read_conll(train_file)
    train.sentences = train.sentences[:sentences]
    valid = read_conll(valid_file)
    tokenizer = load_tokenizer(model_dir)
    model, labels = load_model(model_dir, build_label_list(train))
    label2id = {label: i for i, label in enumerate(labels)}
    items = [f.to_model_input() for f in encode(tokenizer, train.sentences, label2id, 512).features]
    collator = DataCollatorForTokenClassification(tokenizer)
    loader = torch.utils.data.DataLoader(items, shuffle=True, batch_size=8, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=len(loader))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    started = time.perf_counter()
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    val, val_loader = eval_loader(tokenizer, valid.sentences, label2id, 512, collator, 32)
    val_loader = accelerator.prepare(val_loader)
    metrics = evaluate_features(
        accelerator, model, val_loader, val.features, [s.tags for s in valid.sentences], dict(enumerate(labels))
    )
    return {"train_seconds": seconds, "f1": metrics["overall_f1"]}


def nerbatch_epoch(model_dir: str, train_file: str, valid_file: str, sentences: int, workdir: Path) -> dict:
    """One epoch of `nerbatch train` with the recommended settings, in a subprocess."""
    out = workdir / "nerbatch-train"
    cmd = [
        sys.executable,
        "-m",
        "nerbatch",
        "train",
        "--model",
        model_dir,
        "--train",
        train_file,
        "--validation",
        valid_file,
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "1e-4",
        "--warmup-ratio",
        "0.06",
        "--weight-decay",
        "0.01",
        "--group-by-length",
        "--max-train-samples",
        str(sentences),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    epoch = json.loads((out / "metrics.json").read_text())["epochs"][0]
    return {"train_seconds": epoch["train_seconds"], "f1": epoch["overall_f1"]}


def run_training(encoder: str, conll: Path, sentences: int) -> dict:
    """Section 2: reference loop vs nerbatch train, one epoch each on the same sentences."""
    train_file, valid_file = str(conll / "train.txt"), str(conll / "valid.txt")
    with tempfile.TemporaryDirectory() as tmp:
        ours = nerbatch_epoch(encoder, train_file, valid_file, sentences, Path(tmp))
    reference = reference_loop(encoder, train_file, valid_file, sentences)
    return {
        "sentences": sentences,
        "reference": reference,
        "nerbatch": ours,
        "speedup": reference["train_seconds"] / ours["train_seconds"],
        "f1_difference": ours["f1"] - reference["f1"],
    }


def run_memory(model_dir: str, corpus: Path, docs: int, repeats: int, variants: list[str]) -> dict:
    """Section 5: peak RSS on `docs` documents, then on ten files of them, per variant.

    Peak RSS of identical runs varies (on the AMD EPYC machine by about 50 MiB, and one run in ten or
    so peaks 100 MiB higher, at either size), so each size runs `repeats` times, interleaved, and the
    ratio compares medians; every sample is kept in the report."""
    import statistics

    import pyarrow.parquet as pq

    table = pq.read_table(corpus).slice(0, docs)
    report = {"docs": docs, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        one, ten = Path(tmp) / "one", Path(tmp) / "ten"
        one.mkdir()
        ten.mkdir()
        pq.write_table(table, one / "part-0.parquet", row_group_size=500)
        for k in range(10):
            pq.write_table(table, ten / f"part-{k}.parquet", row_group_size=500)
        for variant in variants:
            samples = {"1x": [], "10x": []}
            for _ in range(repeats):
                for name, source in (("1x", one), ("10x", ten)):
                    out = Path(tmp) / f"out-{variant}-{name}"
                    samples[name].append(
                        peak_rss_mb(
                            [sys.executable, "-m", "nerbatch", "annotate", model_dir, str(source)]
                            + ["--output", str(out), "--id-column", "doc_id"]
                            + ["--precision", variant, "--no-progress", "--overwrite"]
                        )
                    )
            median = {name: statistics.median(values) for name, values in samples.items()}
            report[variant] = {
                "peak_rss_mb_1x": median["1x"],
                "peak_rss_mb_10x": median["10x"],
                "ratio": median["10x"] / median["1x"],
                "samples_mb": samples,
            }
    return report


def print_table(report: dict) -> None:
    """Human-readable summary of the report."""
    m = report["machine"]
    click.echo(f"machine: {m['cores']} cores, {m['cpu']}, GPU: {m['gpu'] or 'none'}; torch {m['torch']}")
    if "annotation" in report:
        a = report["annotation"]
        click.echo(f"\nannotation ({a['docs']} docs, {a['tokens']} tokens, {a['device']}):")
        for size, rate in a["pipeline_docs_per_s"].items():
            click.echo(f"  pipeline batch {size:>3}: {rate:8.2f} docs/s")
        click.echo(
            f"  nerbatch annotate:   {a['annotate_docs_per_s']:8.2f} docs/s {a['annotate_tokens_per_s']:9.0f} tokens/s"
        )
        click.echo(
            f"  forward-only ceiling:{a['ceiling_docs_per_s']:8.2f} docs/s {a['ceiling_tokens_per_s']:9.0f} tokens/s"
        )
        click.echo(
            f"  annotate / pipeline best = {a['annotate_over_pipeline']:.2f}x; annotate / ceiling = "
            f"{a['annotate_over_ceiling']:.1%}; documents with different spans: {a['docs_with_different_spans']}"
        )
    if "training" in report:
        t = report["training"]
        click.echo(f"\ntraining, one epoch on {t['sentences']} sentences:")
        for name in ("reference", "nerbatch"):
            click.echo(f"  {name:<10} {t[name]['train_seconds']:8.1f} s   validation F1 {t[name]['f1']:.4f}")
        click.echo(f"  speed-up {t['speedup']:.2f}x, F1 difference {t['f1_difference']:+.4f}")
    if "processes" in report:
        p = report["processes"]
        click.echo(f"\nwhole processes, start to exit ({p['docs']} docs, {p['tokens']} tokens):")
        for name, seconds in p["seconds"].items():
            inside = p["in_job_seconds"].get(name)
            extra = f"   ({inside:.1f} s in the job, {seconds - inside:.1f} s start-up/exit)" if inside else ""
            click.echo(f"  {name:<18} {seconds:7.1f} s {p['docs'] / seconds:7.1f} docs/s{extra}")
        click.echo(
            f"  fp32 annotate / {p['pipeline_best']} = {p['fp32_over_pipeline']:.2f}x; int8 annotate / "
            f"{p['pipeline_best']} = {p['int8_over_pipeline']:.2f}x; int8 / fp32 annotate = {p['int8_over_fp32']:.2f}x"
        )
    if "precision" in report:
        f1 = report["precision"]["f1"]
        click.echo("\nvalidation F1, fp32 vs int8:")
        for level, values in f1.items():
            click.echo(
                f"  {level:<9} fp32 {values['fp32']:.4f}  int8 {values['int8']:.4f}  "
                f"({values['int8'] - values['fp32']:+.4f})"
            )
    if "memory" in report:
        r = report["memory"]
        for precision in (key for key, value in r.items() if isinstance(value, dict)):
            m = r[precision]
            click.echo(
                f"\nmemory, {precision}: peak RSS {m['peak_rss_mb_1x']:.0f} MiB on {r['docs']} docs, "
                f"{m['peak_rss_mb_10x']:.0f} MiB on 10 files of them (ratio {m['ratio']:.2f}; medians of "
                f"{r['repeats']} runs: {[round(v) for v in m['samples_mb']['1x']]} and "
                f"{[round(v) for v in m['samples_mb']['10x']]} MiB)"
            )


@click.command("bench")
@click.option("--model", "model_dir", required=True, help="A fine-tuned token classifier (for annotation/memory).")
@click.option("--encoder", default=None, help="Base encoder for the training comparison (default: the MiniLM package).")
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    envvar="NERBATCH_SHARED_DATA",
    help="Folder holding conll2003/ and reuters21578/ [env: NERBATCH_SHARED_DATA].",
)
@click.option("--docs", default=300, show_default=True, help="Reuters documents for the annotation comparison.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Pipeline batch sizes to try.")
@click.option(
    "--train-sentences",
    default=2000,
    show_default=True,
    help="Training sentences per epoch (14041 = the full split; the default is the reduced mode).",
)
@click.option("--memory-docs", default=1000, show_default=True, help="Documents per copy in the memory check.")
@click.option("--memory-repeats", default=3, show_default=True, help="Runs of each memory measurement (median).")
@click.option(
    "--memory-variants",
    default="fp32,int8",
    show_default=True,
    help="The precisions the memory check runs.",
)
@click.option("--process-docs", default=800, show_default=True, help="Documents for the whole-process comparison.")
@click.option("--sections", default="annotation,processes,precision,training,memory", show_default=True)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    help="Rounds of the annotation comparison (methods interleaved); each figure is the best round.",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("bench.json"), show_default=True)
def bench_command(
    model_dir,
    encoder,
    data,
    docs,
    batch_sizes,
    train_sentences,
    memory_docs,
    memory_repeats,
    memory_variants,
    process_docs,
    sections,
    repeats,
    json_out,
):
    """Benchmark annotation, training and memory side by side; print a table and write JSON."""
    wanted = set(sections.split(","))
    report = {"machine": machine(), "command": " ".join(sys.argv), "model": model_dir, "repeats": repeats}
    corpus = data / "reuters21578" / "reuters21578.parquet"
    if "annotation" in wanted:
        from nerbatch.modeling import ModelError

        try:
            report["annotation"] = run_annotation(
                model_dir, corpus, docs, [int(b) for b in batch_sizes.split(",")], repeats
            )
        except ModelError as exc:
            raise click.ClickException(str(exc)) from exc
    if "processes" in wanted:
        sizes = [int(b) for b in batch_sizes.split(",")]
        report["processes"] = run_processes(model_dir, corpus, process_docs, sizes, repeats)
    if "precision" in wanted:
        report["precision"] = run_precision(model_dir, data / "conll2003")
    if "training" in wanted:
        from nerbatch.demo import minilm_path

        report["training"] = run_training(encoder or minilm_path(), data / "conll2003", train_sentences)
    if "memory" in wanted:
        report["memory"] = run_memory(model_dir, corpus, memory_docs, memory_repeats, memory_variants.split(","))
    json_out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    click.echo(f"\nwritten: {json_out}")


if __name__ == "__main__":
    bench_command()
