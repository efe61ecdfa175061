"""Splitting the work: input discovery, units of work, and which rank takes which unit.

A unit is one row group of a multi-row-group file, or a whole file. Units are numbered in a fixed
order (sorted paths, then row groups), so unit N and its part file `part-N.parquet` are the same
whatever the number of processes; rank r of w takes `units[r::w]` with no coordination. What has
been done is recorded in the output directory (`nerbatch.rundir`).
"""

from __future__ import annotations

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
