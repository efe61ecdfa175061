"""`nerbatch stats`: what an annotate output holds and how its run went, while it runs or after.

Units done / failed / missing (from the bookkeeping `nerbatch.rundir` reads), rows, flagged rows by
reason, entities by label, each rank's throughput, and whether the run is complete. The output
files, and the pieces of units whose file is not assembled yet, are read a few columns at a time in
record batches, so memory stays flat however large the output. Nothing here writes to OUT_DIR.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from nerbatch.parquet_io import read_batches
from nerbatch.rundir import RunDir
from nerbatch.storage import Location


def collect_stats(out_dir: str | Path) -> dict:
    """Summarise an annotate output directory as a JSON-serialisable dict.

    Units done / failed / missing (with the failures' messages), rows, flagged rows by reason,
    entities by label, documents with at least one entity, each rank's throughput in its last run,
    and whether the run is complete. Reads only the `error` and `entities` columns, batch by batch.
    """
    out = RunDir(out_dir)
    run = out.read_run()
    files = out.output_files()
    written = out.written_files()
    states = Counter(unit.state for unit in run.units)
    return {
        "out_dir": str(out_dir),
        # done units are not enough: the run totals are written once every output file is assembled
        "complete": states["done"] == len(run.units) and out.is_complete(),
        "units": {"total": len(run.units), **{s: states[s] for s in ("done", "failed", "missing")}},
        "failed_units": [
            {"unit": u.name, "input": u.describe(), "error": u.error} for u in run.units if u.state == "failed"
        ],
        "missing_units": [{"unit": u.name, "input": u.describe()} for u in run.units if u.state == "missing"],
        "input_rows": sum(unit.rows for unit in run.units),
        "files": len(files),
        "pieces": len(written) - len(files),
        **_count_output(written),
        "ranks": run.ranks,
    }


def _count_output(files: list[Location]) -> dict:
    """Rows, flagged rows by reason, entities by label and documents with entities in `files`."""
    rows = with_entities = 0
    reasons: Counter = Counter()
    labels: Counter = Counter()
    for path in files:
        for batch in read_batches(path, ["error", "entities"]):
            entities = batch.column("entities")
            rows += batch.num_rows
            with_entities += pc.sum(pc.greater(pc.list_value_length(entities), 0), min_count=0).as_py()
            reasons.update(_value_counts(pc.drop_null(batch.column("error"))))
            labels.update(_value_counts(pc.struct_field(pc.list_flatten(entities), "label")))
    return {
        "rows": rows,
        "flagged": sum(reasons.values()),
        "flagged_by_reason": dict(reasons.most_common()),
        "entities": sum(labels.values()),
        "entities_by_label": dict(labels.most_common()),
        "documents_with_entities": with_entities,
    }


def _value_counts(values: pa.Array) -> dict:
    return {item["values"]: item["counts"] for item in pc.value_counts(values).to_pylist()}


def format_stats(stats: dict) -> str:
    """The dict of `collect_stats` as an aligned text report."""
    units = stats["units"]
    if stats["complete"]:
        status = f"complete: {units['done']} of {units['total']} units done"
    elif units["done"] == units["total"]:
        status = "INCOMPLETE: every unit done, but not every output file assembled (rerun the same command)"
    else:
        status = (
            f"INCOMPLETE: {units['done']} of {units['total']} units done, "
            f"{units['failed']} failed, {units['missing']} missing"
        )
    lines = [
        f"output    {stats['out_dir']}",
        f"status    {status}",
        f"rows      {stats['rows']:,} in {stats['files']:,} output files"
        + (f" and {stats['pieces']:,} pieces awaiting assembly" if stats["pieces"] else "")
        + f" (inputs of the run: {stats['input_rows']:,})",
        f"flagged   {stats['flagged']:,}",
        *_indent(_align([[reason, f"{n:,}"] for reason, n in stats["flagged_by_reason"].items()])),
        f"entities  {stats['entities']:,} in {stats['documents_with_entities']:,} documents with at least one",
        *_indent(_align([[label, f"{n:,}"] for label, n in stats["entities_by_label"].items()])),
    ]
    if stats["failed_units"]:
        lines.append("failed units")
        failures = [[u["unit"], " ".join(u["error"].split())] for u in stats["failed_units"]]
        lines += _indent(_align(failures, right=False))
    if stats["missing_units"]:
        lines.append("missing units (neither done nor failed: not run yet, or interrupted)")
        lines += _indent(_align([[u["unit"], u["input"]] for u in stats["missing_units"]], right=False))
    if stats["ranks"]:
        lines.append("throughput (each rank's or actor's last run)")
        header = ["worker", "units", "rows", "tokens", "seconds", "docs/s", "tokens/s", "peak RSS"]
        lines += _indent(_align([header, *map(_rank_row, stats["ranks"])]))
    return "\n".join(lines) + "\n"


def _rank_row(rank: dict) -> list[str]:
    return [
        f"{rank.get('kind', 'rank')} {rank['rank']} of {rank['world']}",
        f"{rank['units']:,}",
        f"{rank['rows']:,}",
        f"{rank['tokens']:,}",
        f"{rank['wall_seconds']:,.1f}",
        f"{rank['docs_per_second']:,.1f}",
        f"{rank['tokens_per_second']:,.0f}",
        "-" if rank.get("peak_rss_mb") is None else f"{rank['peak_rss_mb']:,.0f} MiB",
    ]


def _align(rows: list[list[str]], right: bool = True) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned (numbers)
    unless `right` is false."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if i == 0 or not right else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]
