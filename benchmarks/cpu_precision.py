"""CPU precision, as users run it: whole processes of the pipeline script against `nerbatch annotate`
at each precision and at `--precision auto`, interleaved, on this CPU (named with its features above
every table).

    python -m benchmarks.cpu_precision MODEL_DIR ../shared/data/reuters21578/reuters21578.parquet \
        --docs 800,4000 --pairs 5 --json-out benchmarks/results/cpu-precision-KIND.json

Each round runs every method once, in an order rotated from round to round; a method's figure is the
median over rounds of its time, and of the pipeline's time in the same round divided by its own (a
paired ratio: both saw the same machine). annotate runs with default options except `--aggregation
simple`, the pipeline's work. Its start-up is the whole process less the seconds inside the job (its
stats.json), and its peak RSS is read for the corpus and for ten copies of it. The model's F1 at each
precision is its precision record (`nerbatch check-precision`), copied into the report. Where tcmalloc
or jemalloc is installed (annotate then runs on it: nerbatch.allocator), `auto` runs once more on
glibc's malloc, and the memory check runs on both.

The documents are the first DOCS non-empty Reuters texts that fit one window (bench.py's), so the
pipeline sees each whole.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import machine, peak_rss_mb, window_documents, write_documents, write_report
from benchmarks.engines import commit
from nerbatch import __version__, allocator
from nerbatch.autoprecision import PRECISION_RECORD
from nerbatch.cpu import cpu_kind, describe_cpu, has_native_bf16

HERE = Path(__file__).resolve().parent
PIPELINE = "pipeline batch 1"
GLIBC_AUTO = "annotate auto, glibc malloc"


def annotate_command(model_dir: str, source: Path, out: Path, precision: str, glibc: bool = False) -> list[str]:
    """annotate as users run it: on tcmalloc or jemalloc where installed, or with `glibc` on glibc's malloc."""
    command = ["env", f"{allocator.ENV}=system"] if glibc else []
    command += [sys.executable, "-m", "nerbatch", "annotate", model_dir, str(source), "--output", str(out)]
    command += ["--id-column", "doc_id", "--aggregation", "simple", "--precision", precision]
    return command + ["--overwrite", "--no-progress"]


def methods(model_dir: str, source: Path, tmp: Path) -> dict[str, list[str]]:
    """The commands compared: the pipeline at batch 1, annotate at each precision this CPU runs, and auto."""
    found = {PIPELINE: [sys.executable, str(HERE / "pipeline_job.py"), model_dir, str(source), str(tmp / "p.parquet")]}
    precisions = ["fp32", "bf16", "int8", "auto"] if has_native_bf16() else ["fp32", "int8", "auto"]
    for precision in precisions:
        found[f"annotate {precision}"] = annotate_command(model_dir, source, tmp / precision, precision)
    if allocator.find_library():  # what the allocator costs or saves in time
        found[GLIBC_AUTO] = annotate_command(model_dir, source, tmp / "auto-glibc", "auto", glibc=True)
    return found


def time_rounds(commands: dict[str, list[str]], pairs: int) -> dict[str, list[dict]]:
    """Every command once per round, `pairs` rounds, the order rotated each round; per command and
    round: wall seconds and, for annotate, the seconds inside the job."""
    names = list(commands)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(pairs):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            launched, started = time.time(), time.perf_counter()
            done = subprocess.run(commands[name], capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise click.ClickException(f"{name} failed:\n{done.stderr[-2000:]}")
            record = {"wall": wall}
            if name != PIPELINE:
                out = Path(commands[name][commands[name].index("--output") + 1])
                record["in_job"] = json.loads((out / "_nerbatch" / "stats.json").read_text())["seconds"]
                rank = json.loads(next((out / "_nerbatch" / "stats").glob("rank-*.json")).read_text())
                record["start_up"] = rank["work_started_at"] - launched
                options = json.loads((out / "_nerbatch" / "config.json").read_text())
                record["precision"] = options["options"]["precision"]
                record["choice"] = options.get("precision_choice")
            runs[name].append(record)
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians of wall time, of start-up and of the paired ratio to the pipeline, per method."""
    pipeline = [r["wall"] for r in runs[PIPELINE]]
    summary = {}
    for name, records in runs.items():
        walls = [r["wall"] for r in records]
        row = {"median_seconds": statistics.median(walls), "seconds": walls}
        if name != PIPELINE:
            row["over_pipeline"] = statistics.median(p / w for p, w in zip(pipeline, walls))
            row["start_up_seconds"] = statistics.median(r["start_up"] for r in records)
            row["start_up_and_exit_seconds"] = statistics.median(r["wall"] - r["in_job"] for r in records)
            row["precision"] = records[-1]["precision"]
            row["choice"] = records[-1]["choice"]
        summary[name] = row
    return summary


def memory(model_dir: str, texts: list[str], precisions: list[str], tmp: Path) -> dict:
    """Peak RSS of annotate on the corpus and on ten copies of it, at each precision: on the
    allocator annotate picks (`allocator`), and under "glibc" on glibc's malloc where that is another."""
    one = write_documents(texts, tmp / "one.parquet")
    ten = write_documents(texts * 10, tmp / "ten.parquet")
    found = {}
    for precision in precisions:
        out = tmp / f"memory-{precision}"
        rows = {}
        for glibc in [False, True] if allocator.find_library() else [False]:
            command = [annotate_command(model_dir, source, out, precision, glibc) for source in (one, ten)]
            rss = [peak_rss_mb(c) for c in command]
            rows[glibc] = {"1x_mb": rss[0], "10x_mb": rss[1], "ratio": rss[1] / rss[0]}
        found[precision] = {**rows[False], "allocator": default_allocator()}
        if True in rows:
            found[precision]["glibc"] = rows[True]
    return found


def default_allocator() -> str:
    """The allocator annotate runs on here: tcmalloc, jemalloc or glibc."""
    return allocator.name_of(allocator.find_library() or "")


def print_table(docs: int, summary: dict) -> None:
    click.echo(f"\n{describe_cpu()}\n{docs} documents, whole processes, medians over rounds:")
    click.echo(f"{'method':<28}{'runs':>6}{'seconds':>10}{'x pipeline':>12}{'start-up':>10}  precision")
    for name, row in summary.items():
        ratio = f"{row['over_pipeline']:.2f}x" if "over_pipeline" in row else "1.00x"
        start = f"{row['start_up_seconds']:.2f} s" if "start_up_seconds" in row else "-"
        runs = len(row["seconds"])
        seconds, precision = row["median_seconds"], row.get("precision", "")
        click.echo(f"{name:<28}{runs:>6}{seconds:>9.1f}s{ratio:>12}{start:>10}  {precision}")


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--docs", default="800,4000", show_default=True, help="Corpus sizes, comma-separated.")
@click.option(
    "--pairs", default=5, show_default=True, help="Rounds: each method runs once per round (0: memory check only)."
)
@click.option(
    "--memory/--no-memory",
    "memory_check",
    default=True,
    show_default=True,
    help="Peak RSS at 1x and 10x the first size.",
)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir, corpus, docs, pairs, memory_check, json_out) -> None:
    """Pipeline vs annotate at each precision and auto, whole processes, interleaved."""
    report = {
        "recorded": {
            "nerbatch": __version__,
            "date": datetime.date.today().isoformat(),
            "commit": commit(),
            "machine": machine(),
        },
        "command": " ".join(["python -m benchmarks.cpu_precision", *sys.argv[1:]]),
        "cpu": describe_cpu(),
        "cpu_kind": cpu_kind().name,
        "allocator": default_allocator(),
        "model": model_dir,
        "pairs": pairs,
        "sizes": {},
    }
    record = Path(model_dir) / PRECISION_RECORD
    report["precision_record"] = json.loads(record.read_text()) if record.is_file() else None
    click.echo(describe_cpu())
    sizes = [int(d) for d in docs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes if pairs else []:
            texts, _ = window_documents(model_dir, corpus, size)
            source = write_documents(texts, Path(tmp) / f"docs-{size}.parquet")
            summary = summarize(time_rounds(methods(model_dir, source, Path(tmp)), pairs))
            report["sizes"][str(size)] = summary
            print_table(size, summary)
        if memory_check:
            texts, _ = window_documents(model_dir, corpus, sizes[0])
            precisions = ["fp32", "bf16", "int8"] if has_native_bf16() else ["fp32", "int8"]
            report["memory"] = memory(model_dir, texts, precisions, Path(tmp))
            click.echo(f"\n{describe_cpu()}\npeak RSS, {sizes[0]} documents and ten copies:")
            for precision, row in report["memory"].items():
                for name, found in [(row["allocator"], row), ("glibc", row.get("glibc"))]:
                    if found:
                        line = f"{found['1x_mb']:>8.0f} -> {found['10x_mb']:.0f} MiB ({found['ratio']:.2f}x)"
                        click.echo(f"{precision:<6}{name:<10}{line}")
    write_report(report, json_out)


if __name__ == "__main__":
    main()
