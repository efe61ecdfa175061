"""Helpers every benchmark script shares: the machine's description, interleaved best-of timing,
peak memory of a whole process, and the Reuters documents the annotation comparisons use.

The scripts run as modules from the repository root (`python -m benchmarks.bench ...`), so they
import this as `benchmarks.common`.
"""

from __future__ import annotations

import math
import platform
import subprocess
import sys
import time
from pathlib import Path

RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def machine() -> dict:
    """Cores, CPU and GPU names of this machine."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):  # not Linux: keep platform's name
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def report_header(module: str) -> dict:
    """The fields every result file starts with: the machine, the CPU with its kind and deciding
    flags, and the command that ran (`python -m benchmarks.MODULE ARGS`)."""
    import shlex

    from nerbatch.cpu import cpu_kind, describe_cpu

    command = " ".join([f"python -m benchmarks.{module}", *map(shlex.quote, sys.argv[1:])])
    return {"machine": machine(), "cpu": describe_cpu(), "cpu_kind": cpu_kind().name, "command": command}


def write_report(report: dict, json_out: Path | None) -> None:
    """`report` as indented JSON at `json_out`, if given, saying where."""
    import json

    import click

    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        click.echo(f"written: {json_out}")


def load_documents(corpus: Path, count: int, tokenizer, max_length: int) -> list[str]:
    """The first `count` non-null texts that fit in one window (so the pipeline sees them whole)."""
    import pyarrow.parquet as pq

    texts = []
    for batch in pq.ParquetFile(corpus).iter_batches(columns=["text"], batch_size=2000):
        for text in batch.column("text").to_pylist():
            if text and text.strip() and len(tokenizer(text)["input_ids"]) <= max_length:
                texts.append(text)
                if len(texts) == count:
                    return texts
    return texts


def window_documents(model_dir: str, corpus: Path, count: int):
    """`load_documents` with the model's tokenizer and window length; returns (texts, tokenizer)."""
    from nerbatch.modeling import load_token_classifier, max_model_length

    model, tokenizer = load_token_classifier(model_dir)
    return load_documents(corpus, count, tokenizer, max_model_length(tokenizer, model.config)), tokenizer


def best_times(methods: dict, repeats: int) -> tuple[dict, dict]:
    """Run every method once per round, `repeats` rounds, interleaved so that all of them see the
    same machine conditions; return each method's best wall time and the output of that round (for
    whole processes, the seconds inside the job: the rest of the same round is start-up and exit)."""
    best = {name: math.inf for name in methods}
    outputs = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            started = time.perf_counter()
            output = fn()
            seconds = time.perf_counter() - started
            if seconds < best[name]:
                best[name], outputs[name] = seconds, output
    return best, outputs


def write_documents(texts: list[str], path: Path) -> Path:
    """The benchmark's documents as a Parquet file (doc_id, text), as annotate and the script read them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": list(range(len(texts))), "text": texts}), path)
    return path


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of `cmd` (and its children), in MiB."""
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], check=True, capture_output=True, text=True)
    return int(done.stdout.split("MAXRSS_KB")[-1]) / 1024
