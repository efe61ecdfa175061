"""The output layout as analysts and operators meet it, measured side by side in one run.

    python -m benchmarks.output_layout --model MODEL_DIR --data ../shared/data --json-out layout.json

1. scan: a DuckDB count of entities by label over the same synthetic output rows written in the
   0.2 layout (one file per input row group, `--scan-unit-rows` rows, row groups of 512) and in today's
   default (files assembled in row groups of 100,000 rows), both by nerbatch's own writers;
2. run: Reuters rows written with small input row groups (default 20,000 rows in row groups of
   100) annotated for real, with file:// URIs for input and output: killed with SIGKILL once a few
   units are done, rerun, and compared row for row with an uninterrupted run; file count, row-group
   sizes, kept column types, and peak RSS of the default layout against a run that writes the
   0.2-like layout (`--file-rows 1 --row-group-rows 512`).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import machine, peak_rss_mb

LABELS = ["PER", "ORG", "LOC", "MISC"]
QUERY = (
    "SELECT e.label, count(*) AS n FROM (SELECT unnest(entities) AS e FROM read_parquet('{}')) GROUP BY 1 ORDER BY 1"
)


def synthetic_chunk(first: int, rows: int, rng: random.Random) -> dict[str, list]:
    """Output columns for `rows` documents with 0-20 plausible entities each."""
    entities = []
    for _ in range(rows):
        spans, start = [], 0
        for _ in range(rng.randint(0, 20)):
            start += rng.randint(1, 60)
            end = start + rng.randint(3, 25)
            spans.append(
                {
                    "start": start,
                    "end": end,
                    "label": rng.choice(LABELS),
                    "text": "x" * (end - start),
                    "score": rng.random(),
                }
            )
            start = end
        entities.append(spans)
    return {
        "doc_id": list(range(first, first + rows)),
        "entities": entities,
        "error": [None] * rows,
        "n_windows": [1] * rows,
    }


def write_layouts(rows: int, unit_rows: int, directory: Path) -> dict[str, Path]:
    """The same synthetic rows in the 0.2 layout (one file per input row group of `unit_rows`, row
    groups of 512) and in the assembled layout, by nerbatch's writers."""
    from nerbatch.assemble import assemble_file
    from nerbatch.parquet_io import PartWriter, output_schema
    from nerbatch.storage import locate

    schema = output_schema([pa.field("doc_id", pa.int64())], {"version": "bench"})
    old, new = directory / "old", directory / "new"
    pieces = []
    rng = random.Random(0)
    for unit, first in enumerate(range(0, rows, unit_rows)):  # one input row group per unit
        part = locate(old / f"part-{unit:06d}.parquet")
        writer = PartWriter(part, locate(directory / "tmp" / f"{unit}.parquet"), schema)
        for start in range(first, min(first + unit_rows, rows), 512):  # one row group per 512-row read
            writer.write(synthetic_chunk(start, min(512, first + unit_rows - start, rows - start), rng))
        writer.publish()
        pieces.append(part)
    assemble_file("part-00000", pieces, locate(new), locate(directory / "tmp" / "new"), schema, None, 100_000)
    return {"0.2 layout": old, "assembled": new}


def count_entities(directory: Path, repeats: int) -> tuple[float, list]:
    """Best wall time of the DuckDB query over `directory/*.parquet`, and its result."""
    import duckdb

    best, result = float("inf"), None
    for _ in range(repeats):
        connection = duckdb.connect()  # a fresh connection: no cached metadata between rounds
        started = time.perf_counter()
        result = connection.sql(QUERY.format(directory / "*.parquet")).fetchall()
        best = min(best, time.perf_counter() - started)
        connection.close()
    return best, result


def run_scan(rows: int, unit_rows: int, repeats: int) -> dict:
    """Section 1: DuckDB scan time and file counts, old layout vs assembled layout."""
    with tempfile.TemporaryDirectory() as tmp:
        layouts = write_layouts(rows, unit_rows, Path(tmp))
        report = {"rows": rows, "input_row_group_rows": unit_rows}
        results = []
        for name, directory in layouts.items():
            files = sorted(directory.glob("*.parquet"))
            seconds, result = count_entities(directory, repeats)
            results.append(result)
            report[name] = {
                "files": len(files),
                "row_groups": sum(pq.ParquetFile(f).metadata.num_row_groups for f in files),
                "megabytes": sum(f.stat().st_size for f in files) / 2**20,
                "duckdb_seconds": seconds,
            }
        report["same_counts"] = results[0] == results[1]
        report["speedup"] = report["0.2 layout"]["duckdb_seconds"] / report["assembled"]["duckdb_seconds"]
    return report


def annotate_command(model: str, source: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nerbatch",
        "annotate",
        model,
        source,
        "--output",
        out,
        "--id-column",
        "doc_id",
        "--keep-columns",
        "date,title",
        "--precision",
        "int8",
        "--no-progress",
        *extra,
    ]


def kill_after_units(cmd: list[str], done_dir: Path, units: int) -> None:
    """Start `cmd`, SIGKILL it once `units` completion markers exist."""
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (done_dir.exists() and len(list(done_dir.glob("*.json"))) >= units):
        if job.poll() is not None:
            raise RuntimeError("the job ended before it could be killed; use more rows")
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()


def read_rows(out: Path) -> pa.Table:
    files = sorted(p for p in out.rglob("*.parquet") if "_nerbatch" not in p.parts)
    return pa.concat_tables(pq.read_table(f) for f in files).sort_by("doc_id")


def run_annotate(model: str, corpus: Path, rows: int, group_rows: int) -> dict:
    """Section 2: a real run: kill and rerun with file:// URIs vs uninterrupted; layout; peak RSS."""
    table = pq.read_table(corpus, columns=["doc_id", "date", "title", "text"]).slice(0, rows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "corpus.parquet"
        pq.write_table(table, source, row_group_size=group_rows)
        whole, killed, old = tmp / "whole", tmp / "killed", tmp / "old"
        rss_new = peak_rss_mb(annotate_command(model, str(source), str(whole)))
        rss_old = peak_rss_mb(
            annotate_command(model, str(source), str(old), "--file-rows", "1", "--row-group-rows", "512")
        )
        uris = (f"file://{source}", f"file://{killed}")
        kill_after_units(annotate_command(model, *uris), killed / "_nerbatch" / "done", 5)
        done_before_rerun = len(list((killed / "_nerbatch" / "done").glob("*.json")))
        subprocess.run(annotate_command(model, *uris), check=True, capture_output=True)
        files = sorted(whole.glob("*.parquet"))
        groups = [
            [pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
            for f in files
        ]
        output = read_rows(whole)
        return {
            "rows": rows,
            "input_row_groups": pq.ParquetFile(source).metadata.num_row_groups,
            "files": len(files),
            "row_groups_per_file": groups,
            "row_groups_full_but_last": all(min(g[:-1], default=10_000) >= 10_000 for g in groups),
            "units_done_when_killed": done_before_rerun,
            "killed_and_rerun_equals_uninterrupted": read_rows(killed).equals(output),
            "old_layout_equals": read_rows(old).equals(output),
            "old_layout_files": len(list(old.glob("*.parquet"))),
            "kept_types": {name: str(output.schema.field(name).type) for name in ("date", "title")},
            "kept_types_equal_input": all(
                output.schema.field(n).type == table.schema.field(n).type for n in ("date", "title")
            ),
            "peak_rss_mb": {"assembled": rss_new, "0.2 layout": rss_old},
            "rss_ratio": rss_new / rss_old,
        }


def print_report(report: dict) -> None:
    m = report["machine"]
    click.echo(f"machine: {m['cores']} cores, {m['cpu']}; torch {m['torch']}")
    if "scan" in report:
        s = report["scan"]
        click.echo(
            f"\nDuckDB count of entities by label over {s['rows']:,} output rows "
            f"(input row groups of {s['input_row_group_rows']:,}):"
        )
        for name in ("0.2 layout", "assembled"):
            r = s[name]
            click.echo(
                f"  {name:<11} {r['files']:4d} files {r['row_groups']:5d} row groups {r['megabytes']:7.1f} MB "
                f"{r['duckdb_seconds'] * 1000:8.1f} ms"
            )
        click.echo(f"  assembled is {s['speedup']:.1f}x faster; same counts: {s['same_counts']}")
    if "run" in report:
        r = report["run"]
        click.echo(f"\nannotate {r['rows']:,} rows from {r['input_row_groups']} input row groups (int8):")
        click.echo(
            f"  files {r['files']}, row groups per file {r['row_groups_per_file']} "
            f"(0.2-like layout: {r['old_layout_files']} files)"
        )
        click.echo(
            f"  SIGKILL after {r['units_done_when_killed']} units + rerun (file:// URIs) equals an "
            f"uninterrupted run: {r['killed_and_rerun_equals_uninterrupted']}"
        )
        click.echo(f"  kept columns {r['kept_types']}, types as in the input: {r['kept_types_equal_input']}")
        rss = r["peak_rss_mb"]
        click.echo(
            f"  peak RSS {rss['assembled']:.0f} MiB vs {rss['0.2 layout']:.0f} MiB in the 0.2-like layout "
            f"(ratio {r['rss_ratio']:.2f})"
        )


@click.command()
@click.option("--model", required=True, help="A fine-tuned token classifier (section run).")
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    envvar="NERBATCH_SHARED_DATA",
    help="Folder holding reuters21578/ [env: NERBATCH_SHARED_DATA].",
)
@click.option("--scan-rows", default=200_000, show_default=True)
@click.option("--scan-unit-rows", default=1000, show_default=True, help="Input row-group size behind the 0.2 layout.")
@click.option("--run-rows", default=20_000, show_default=True)
@click.option("--group-rows", default=100, show_default=True, help="Input row-group size of the run section.")
@click.option("--repeats", default=5, show_default=True, help="DuckDB rounds; the best is reported.")
@click.option("--sections", default="scan,run", show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("layout.json"), show_default=True)
def main(model, data, scan_rows, scan_unit_rows, run_rows, group_rows, repeats, sections, json_out):
    """Measure the output layout: DuckDB scan, resume equality, file/row-group sizes, memory."""
    wanted = set(sections.split(","))
    report = {"machine": machine(), "command": " ".join(sys.argv)}
    if "scan" in wanted:
        report["scan"] = run_scan(scan_rows, scan_unit_rows, repeats)
    if "run" in wanted:
        report["run"] = run_annotate(model, data / "reuters21578" / "reuters21578.parquet", run_rows, group_rows)
    json_out.write_text(json.dumps(report, indent=1))
    print_report(report)
    click.echo(f"\nwritten: {json_out}")


if __name__ == "__main__":
    main()
