"""Where attention by two batched matrix products beats torch's fused kernel on CPU: the model's
forward pass over the batches annotate builds for real documents (the model's own segmentation and
batch limits), at fp32 and int8, with `nerbatch.encoder.MATMUL_ATTENTION_MAX_LENGTH` set to each
value in turn (0: the fused kernel everywhere). Interleaved rounds, medians; each setting's seconds
are also split by padded window length, to place the crossover.

    python -m benchmarks.attention MODEL_DIR ../shared/data/reuters21578/reuters21578.parquet \
        --docs 1000 --rounds 5 --json-out benchmarks/results/attention-KIND.json

An in-process check that places a threshold; what users get is measured by whole processes in
benchmarks/cpu_precision.py.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path

import click

from benchmarks.common import report_header, window_documents, write_report

BUCKET = 32  # padded lengths are grouped in buckets of this many tokens


def annotate_batches(model, tokenizer, texts: list[str]) -> list[tuple]:
    """The (input ids, attention mask) batches annotate runs for `texts`, recorded at fp32."""
    import torch

    from nerbatch.inference import tag_texts

    recorded = []

    def record(module, args, kwargs):
        recorded.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    with torch.inference_mode():
        tag_texts(texts, model, tokenizer, precision="fp32")
    handle.remove()
    return recorded


def time_batches(model, batches: list[tuple]) -> tuple[float, dict[int, float]]:
    """Seconds of the forward pass over `batches`, in all and by padded-length bucket."""
    import torch

    by_length: dict[int, float] = defaultdict(float)
    with torch.inference_mode():
        for ids, mask in batches:
            started = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            by_length[ids.shape[1] // BUCKET * BUCKET] += time.perf_counter() - started
    return sum(by_length.values()), dict(by_length)


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--docs", default=1000, show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--thresholds", default="0,64,96,128,256", show_default=True, help="Values of the threshold compared.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir, corpus, docs, rounds, thresholds, json_out) -> None:
    """Forward-pass seconds at each attention threshold, fp32 and int8, and each one's speed-up."""
    from nerbatch import encoder
    from nerbatch.cpu import describe_cpu
    from nerbatch.modeling import load_token_classifier
    from nerbatch.precision import quantize_int8

    settings = [int(t) for t in thresholds.split(",")]
    texts, _ = window_documents(model_dir, corpus, docs)
    model, tokenizer = load_token_classifier(model_dir, rust_tokenizer=True)
    batches = annotate_batches(model, tokenizer, texts)
    models = {"fp32": model, "int8": quantize_int8(model, tokenizer)}
    runs = {(p, t): [] for p in models for t in settings}
    lengths = {key: defaultdict(list) for key in runs}
    for round_ in range(rounds + 1):  # round 0 warms up
        keys = list(runs)
        for precision, threshold in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            encoder.MATMUL_ATTENTION_MAX_LENGTH = threshold
            seconds, by_length = time_batches(models[precision], batches)
            if round_:
                runs[precision, threshold].append(seconds)
                for bucket, value in by_length.items():
                    lengths[precision, threshold][bucket].append(value)
    click.echo(describe_cpu())
    click.echo(f"{len(batches)} batches of {docs} documents; padded lengths {BUCKET} wide")
    report = report_header("attention") | {"model": model_dir, "docs": docs, "batches": len(batches), "rounds": rounds}
    report["results"] = {}
    for precision in models:
        fused = statistics.median(runs[precision, 0]) if 0 in settings else None
        for threshold in settings:
            median = statistics.median(runs[precision, threshold])
            buckets = {b: statistics.median(v) for b, v in sorted(lengths[precision, threshold].items())}
            speedup = fused / median if fused else None
            shown = f"{speedup:5.2f}x fused" if speedup else ""
            click.echo(f"{precision} threshold {threshold:4d}: {median:7.2f} s {shown}")
            report["results"][f"{precision}/{threshold}"] = {
                "median_seconds": median,
                "over_fused": speedup,
                "seconds_by_length": {str(b): round(s, 4) for b, s in buckets.items()},
            }
    write_report(report, json_out)


if __name__ == "__main__":
    main()
