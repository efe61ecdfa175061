"""The golden check of a refactor: two annotate outputs of the same corpus, model and options hold
the same files, the same rows (every column, spans exactly) and the same output metadata.

    python -m benchmarks.compare_outputs OUT_BEFORE OUT_AFTER [--ignore-metadata nerbatch.version]

Annotate the corpus with the old checkout (e.g. a `git worktree` of the last release, run with
PYTHONPATH pointing at it) and with this one, then compare. Exits 1 on the first difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def metadata(table) -> dict:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"nerbatch")}


def compare(before: Path, after: Path, ignore: set[str]) -> list[str]:
    """The differences between two output directories, as lines (empty when they match)."""
    files = [sorted(p.relative_to(d).as_posix() for p in d.rglob("*.parquet") if "_nerbatch" not in p.parts)
             for d in (before, after)]  # fmt: skip
    if files[0] != files[1]:
        return [f"files differ: {files[0]} vs {files[1]}"]
    found = []
    for name in files[0]:
        a, b = pq.read_table(before / name), pq.read_table(after / name)
        if a.schema.remove_metadata() != b.schema.remove_metadata():
            found.append(f"{name}: schemas differ")
        elif a.to_pylist() != b.to_pylist():
            found.append(f"{name}: rows differ")
        meta = [{k: v for k, v in metadata(t).items() if k not in ignore} for t in (a, b)]
        if meta[0] != meta[1]:
            keys = sorted(k for k in set(meta[0]) | set(meta[1]) if meta[0].get(k) != meta[1].get(k))
            found.append(f"{name}: metadata differs in {keys}")
    totals = [json.loads((d / "_nerbatch" / "stats.json").read_text()) for d in (before, after)]
    counted = ("rows", "docs", "flagged", "tokens", "windows", "entities", "units", "files", "complete")
    if [{k: t.get(k) for k in counted} for t in totals][0] != [{k: t.get(k) for k in counted} for t in totals][1]:
        found.append("stats.json totals differ")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ignore-metadata", action="append", default=[], help="A metadata key not to compare.")
    args = parser.parse_args()
    found = compare(args.before, args.after, set(args.ignore_metadata))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in args.after.rglob("part-*.parquet"))
    print("\n".join(found) if found else f"identical: {rows} rows, the same files, spans and metadata")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
