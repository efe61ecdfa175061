"""Splitting the work: input discovery, units of work, and which rank takes which unit.

A unit is one row group of a multi-row-group file, or a whole file. Units are numbered in a fixed
order (sorted paths, then row groups), so unit N and its part file `part-N.parquet` are the same
whatever the number of processes; rank r of w takes `units[r::w]` with no coordination. What has
been done is recorded in the output directory (`nerbatch.rundir`).
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass

from nerbatch.errors import NerbatchError
from nerbatch.parquet_io import InputError, open_parquet
from nerbatch.storage import Location, locate, one_line


@dataclass(frozen=True)
class Unit:
    index: int
    path: str  # the input's absolute path or URI, as recorded in the output (`source_file`)
    row_group: int | None  # None: the whole file
    first_row: int  # index in the file of the unit's first row
    rows: int
    footer: str = ""  # a hash of the file's Parquet footer: a file rewritten under the same name differs

    @property
    def name(self) -> str:
        return unit_name(self.index)

    @property
    def location(self) -> Location:
        return locate(self.path)

    def describe(self) -> str:
        where = "" if self.row_group is None else f" row group {self.row_group}"
        return f"{self.path}{where}"


def unit_name(index: int) -> str:
    """The name of unit `index` in OUT_DIR's bookkeeping (markers, pieces)."""
    return f"unit-{index:06d}"


def discover_inputs(inputs: list[str], exclude: Location | None = None) -> list[Location]:
    """Parquet files named by `inputs` (files, directories searched recursively, or glob patterns;
    plain paths or URIs), sorted and without duplicates.

    Files under `exclude` (the output directory) are skipped: an OUT_DIR inside an input directory
    must not feed a rerun its own output. A location that cannot be listed (no such bucket, no
    credentials, unreachable host) is an `InputError` naming it.
    """
    found: dict[str, Location] = {}
    for spec in inputs:
        try:
            matches = _matches(locate(spec))
        except NerbatchError:
            raise
        except Exception as exc:  # fsspec backends raise their own errors (PermissionError, ClientError, ...)
            raise one_line(spec, "list this location", exc) from exc
        matches = [m for m in matches if exclude is None or not m.is_inside(exclude)]
        if not matches:
            raise InputError(f"{spec}: no such file, or no Parquet files in it")
        found.update((m.uri, m) for m in matches)
    return [found[uri] for uri in sorted(found)]


def _matches(location: Location) -> list[Location]:
    if any(c in location.path for c in "*?["):
        return [location.at(p) for p in sorted(location.fs.glob(location.path)) if location.fs.isfile(p)]
    kind = location.kind()
    if kind == "directory":
        return [f for f in location.find(".parquet") if not _hidden(f.relative_to(location))]
    return [location] if kind == "file" else []


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def plan_units(files: list[Location], columns: list[str], same_type: list[str] = ()) -> list[Unit]:
    """Read every footer, check that `columns` exist (and that the `same_type` ones have one type in
    every file, since they are copied into one output schema), and number the units. Fails before any work."""
    units: list[Unit] = []
    types: dict[str, tuple[Location, object]] = {}
    for path in files:
        meta = open_parquet(path).metadata
        schema = meta.schema.to_arrow_schema()
        for column in columns:
            if column not in schema.names:
                raise InputError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
        for column in same_type:
            first, kind = types.setdefault(column, (path, schema.field(column).type))
            if schema.field(column).type != kind:
                raise InputError(
                    f"{path}: column {column!r} is {schema.field(column).type}, but {kind} in {first}; "
                    "a copied column needs one type in every input file"
                )
        footer = footer_hash(meta)
        if meta.num_row_groups <= 1:
            units.append(Unit(len(units), path.uri, None, 0, meta.num_rows, footer))
            continue
        first_row = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(Unit(len(units), path.uri, group, first_row, rows, footer))
            first_row += rows
    return units


def footer_hash(meta) -> str:
    """A hash of a Parquet file's footer (`FileMetaData`): its schema and every column chunk's
    offset, size and statistics, so another content under the same name and row-group layout
    differs, while the same table written again by the same writer does not (no timestamps)."""
    import hashlib

    import pyarrow as pa

    sink = pa.BufferOutputStream()
    meta.write_metadata_file(sink)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def group_units(units: list[Unit], file_rows: int) -> list[list[Unit]]:
    """Consecutive units gathered into output files of at least `file_rows` rows (the last may
    have fewer): file k holds the rows of its units in input order."""
    groups: list[list[Unit]] = []
    rows = file_rows
    for unit in units:
        if rows >= file_rows:
            groups.append([])
            rows = 0
        groups[-1].append(unit)
        rows += unit.rows
    return groups


def units_for_rank(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """The units rank `rank` of `world` processes: every world-th unit, starting at its rank."""
    return units[rank::world]


# --- warnings about the inputs (printed once, by the process that plans for the others) ----------

SHELL_EXPANDED_INPUTS = 1000  # more input arguments than this: the shell expanded a pattern


def shell_expanded_warning(inputs: list[str]) -> str | None:
    """A warning when the command line holds more than `SHELL_EXPANDED_INPUTS` input paths: a shell
    glob such as dump/*.parquet, unquoted, passes every file as an argument (and beyond the system's
    limit the command does not start at all: "Argument list too long"). A directory or a quoted glob
    names the same files in one argument, and nerbatch lists them itself."""
    if len(inputs) <= SHELL_EXPANDED_INPUTS:
        return None
    parents = {os.path.dirname(spec.rstrip("/")) for spec in inputs}
    if len(parents) == 1:
        parent = parents.pop() or "."
        pattern = "*.parquet" if parent == "." else f"{parent}/*.parquet"
        instead = f"pass their directory ({parent}/) or a quoted glob ('{pattern}') instead"
    else:
        try:
            common = os.path.commonpath(inputs) or "."
        except ValueError:  # absolute and relative paths mixed
            common = "DIR"
        instead = f"pass a directory holding them ({common}/ is searched recursively) or a quoted glob instead"
    return (
        f"nerbatch annotate: warning: the shell passed {len(inputs):,} input paths; {instead}: nerbatch lists "
        'the files itself, and a longer list of paths stops the command from starting ("Argument list too long")'
    )


# A unit (one row group) big enough to hold up the whole run: at least this many rows, more than
# HUGE_UNIT_SHARE of all input rows and more than HUGE_UNIT_OVER_MEDIAN times the median unit, in
# an input of at least HUGE_UNIT_MIN_UNITS units (with fewer, "median" says little).
HUGE_UNIT_ROWS = 10_000
HUGE_UNIT_SHARE = 0.10
HUGE_UNIT_OVER_MEDIAN = 4
HUGE_UNIT_MIN_UNITS = 8


def huge_row_group_warning(units: list[Unit]) -> str | None:
    """A warning naming the largest unit when it alone would set the run's wall time: units are row
    groups, each annotated by one process, so the other processes finish their shares and wait
    (see docs/running-at-scale.md#row-groups-and-units). None when the units are balanced enough."""
    if len(units) < HUGE_UNIT_MIN_UNITS:
        return None
    total = sum(u.rows for u in units)
    median = statistics.median(u.rows for u in units)
    huge = max(units, key=lambda u: u.rows)  # the first of the largest
    big = huge.rows >= HUGE_UNIT_ROWS
    if not (big and huge.rows > HUGE_UNIT_SHARE * total and huge.rows > HUGE_UNIT_OVER_MEDIAN * median):
        return None
    where = f"{huge.path} row group {huge.row_group}" if huge.row_group is not None else f"{huge.path} (one row group)"
    return (
        f"nerbatch annotate: warning: {where} holds {huge.rows:,} rows, {huge.rows / total:.0%} of the input and "
        f"{huge.rows / median:,.0f} times the median row group ({median:,.0f} rows); a row group is one unit of "
        "work, annotated by one process while the others wait once their units are done. Rewrite that file with "
        "smaller row groups: see docs/running-at-scale.md#row-groups-and-units"
    )


def warn_about_units(units: list[Unit], file=None) -> None:
    """Print `huge_row_group_warning` on stderr if there is one (call it once per run, from the
    process that plans it: rank 0, or the Ray driver)."""
    message = huge_row_group_warning(units)
    if message:
        print(message, file=file or sys.stderr, flush=True)
