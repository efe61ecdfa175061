"""Analytics-sized output: the pieces of consecutive units assembled into large part files.

Work and output have different right sizes. A unit (one input row group) is small so that a
preempted run loses little and every rank gets work; analytics engines want few files of large row
groups (DuckDB reads row groups under ~5,000 rows several times slower; ~100,000 is where it stops
mattering). So each unit is written as a *piece* under `_nerbatch/pieces/`, and once every unit of
an output file is done, the file is assembled from its pieces in input order, in row groups of
`row_group_rows`, written under a temporary name and renamed into place. Readers of OUT_DIR only
ever see whole files. With `partition_by`, the rows of a file go to Hive-style directories
`COLUMN=value/part-K.parquet`, the value kept in the path (not in the file) as Hive, Spark, DuckDB
and Polars expect.

A crash during assembly leaves the pieces and no file marker: the rerun assembles again, replacing
whatever was renamed into place with the same content.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nerbatch.parquet_io import InputError, iter_batches, open_parquet
from nerbatch.storage import Location

# Buffered rows are flushed early (as a smaller row group) past this many bytes, so a kept column of
# long strings cannot make memory grow with `row_group_rows`.
BUFFER_BYTES = 256 << 20
# More directories than this is almost always a column chosen by mistake (an id, a timestamp).
MAX_PARTITIONS = 1_000
# Partition files written at once while assembling one output file: more partitions take more passes
# over its pieces, so open files (and object-store upload buffers) stay bounded.
MAX_OPEN_FILES = 64
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_+@-][A-Za-z0-9_.+@-]*")


def partition_name(value) -> str:
    """The directory name of a partition value (`true`/`false` for booleans, ISO dates, as Hive)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _partitionable(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_date(kind)
    )


def check_partition_values(files: list[Location], column: str) -> int:
    """Scan `column` of every input before any work: a string, integer, boolean or date column (a
    float has no exact directory name), no nulls, every value a safe directory name, at most
    MAX_PARTITIONS values. Returns the number of distinct values."""
    seen: set[str] = set()
    for path in files:
        source = open_parquet(path)
        kind = source.schema_arrow.field(column).type
        if not _partitionable(kind):
            raise InputError(
                f"{path}: column {column!r} is {kind}; --partition-by takes strings, integers, booleans or dates"
            )
        try:
            _scan_partition_column(source, path, column, seen)
        except InputError:
            raise
        except Exception as exc:  # a corrupt data page: the file and column, in one line
            raise InputError(f"{path}: column {column!r} could not be read ({type(exc).__name__}: {exc})") from exc
    return len(seen)


def _scan_partition_column(source: pq.ParquetFile, path: Location, column: str, seen: set[str]) -> None:
    row = 0
    for batch in source.iter_batches(columns=[column], batch_size=65536, use_threads=False):
        values = batch.column(0)
        if values.null_count:
            first = row + pc.index(pc.is_null(values), True).as_py()
            raise InputError(
                f"{path}: row {first}: column {column!r} is null; --partition-by needs a value in every row"
            )
        for value in pc.unique(values).to_pylist():
            name = partition_name(value)
            if name not in seen:
                _check_safe(name, path, column)
                seen.add(name)
        if len(seen) > MAX_PARTITIONS:
            raise InputError(
                f"{path}: column {column!r} has more than {MAX_PARTITIONS:,} distinct values; "
                "--partition-by wants a low-cardinality column (a date, a language, a source)"
            )
        row += len(values)


def _check_safe(name: str, path: Location, column: str) -> None:
    if not _SAFE_VALUE.fullmatch(name) or len(name) > 200:
        raise InputError(
            f"{path}: column {column!r} has the value {name!r}, which is not a safe directory name "
            "(ASCII letters, digits, _ - . + @; not starting with '.'; at most 200 characters)"
        )


class FileAssembler:
    """Writes the rows of one output file (or of some of its partitions) in row groups of
    `row_group_rows`; with `only`, rows of other partitions are left for another pass."""

    def __init__(
        self,
        root: Location,
        temporary_root: Location,
        name: str,
        schema: pa.Schema,
        partition_by: str | None,
        row_group_rows: int,
        only: set[str] | None = None,
    ):
        self.root, self.temporary_root, self.name = root, temporary_root, name
        self.partition_by, self.row_group_rows, self.only = partition_by, row_group_rows, only
        self.schema = schema.remove(schema.get_field_index(partition_by)) if partition_by else schema
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.buffers: dict[str, list[pa.RecordBatch]] = {}
        self.sizes: dict[str, int] = {}  # buffered bytes per file

    def add(self, batch: pa.RecordBatch) -> int:
        """Route a batch of piece rows to its file(s), flushing full row groups; returns the rows taken."""
        if not self.partition_by:
            self._buffer("", batch)
            return batch.num_rows
        keys = batch.column(self.partition_by)
        data = batch.drop_columns([self.partition_by])
        taken = 0
        for value in pc.unique(keys):  # Arrow scalars: a Python value here would make pyarrow import pandas
            name = partition_name(value.as_py())
            if self.only is None or name in self.only:
                rows = data.filter(pc.equal(keys, value))
                self._buffer(name, rows)
                taken += rows.num_rows
        return taken

    def _buffer(self, key: str, batch: pa.RecordBatch) -> None:
        buffer = self.buffers.setdefault(key, [])
        buffer.append(batch)
        self.sizes[key] = self.sizes.get(key, 0) + batch.nbytes
        rows = sum(b.num_rows for b in buffer)
        while rows >= self.row_group_rows:
            self._write(key, self.row_group_rows)
            rows -= self.row_group_rows
        if sum(self.sizes.values()) > BUFFER_BYTES:
            self._write(max(self.sizes, key=self.sizes.get), None)

    def _write(self, key: str, rows: int | None) -> None:
        """Write the first `rows` buffered rows of `key` (all when None) as one row group."""
        table = pa.Table.from_batches(self.buffers[key], schema=self.schema)
        if rows is None or rows >= table.num_rows:
            head, rest = table, []
        else:
            head, rest = table.slice(0, rows), table.slice(rows).to_batches()
        self.buffers[key] = list(rest)
        self.sizes[key] = sum(b.nbytes for b in rest)
        if head.num_rows:
            self._writer(key).write_table(head, row_group_size=head.num_rows)

    def _writer(self, key: str) -> pq.ParquetWriter:
        if key not in self.writers:
            temporary = self.temporary_root / self._relative(key)
            temporary.make_parent()
            self.writers[key] = pq.ParquetWriter(
                temporary.path, self.schema, compression="zstd", filesystem=temporary.fs
            )
        return self.writers[key]

    def _relative(self, key: str) -> str:
        file = f"{self.name}.parquet"
        return f"{self.partition_by}={key}/{file}" if self.partition_by else file

    def publish(self) -> list[str]:
        """Flush, close and rename every file into place; returns their paths relative to the root."""
        for key in list(self.buffers):
            self._write(key, None)
        if not self.writers and not self.partition_by:  # an output file of zero rows still exists
            self._writer("")
        published = []
        for key, writer in self.writers.items():
            writer.close()
            (self.temporary_root / self._relative(key)).move_to(self.root / self._relative(key))
            published.append(self._relative(key))
        return sorted(published)


def assemble_file(
    name: str,
    pieces: list[Location],
    root: Location,
    temporary_root: Location,
    schema: pa.Schema,
    partition_by: str | None,
    row_group_rows: int,
) -> dict:
    """Assemble one output file from its units' pieces (in order); returns what was published.

    Partitioned output is written MAX_OPEN_FILES partitions per pass over the pieces."""
    passes = [None]
    if partition_by:
        names = sorted(_partition_names(pieces, partition_by))
        passes = [set(names[i : i + MAX_OPEN_FILES]) for i in range(0, len(names), MAX_OPEN_FILES)]
    published, rows = [], 0
    for only in passes:
        assembler = FileAssembler(root, temporary_root, name, schema, partition_by, row_group_rows, only)
        for piece in pieces:
            for batch in iter_batches(piece, None, None, 65536):
                rows += assembler.add(batch)
        published += assembler.publish()
    temporary_root.remove_tree()
    return {"files": sorted(published), "rows": rows}


def _partition_names(pieces: list[Location], column: str) -> set[str]:
    names: set[str] = set()
    for piece in pieces:
        for batch in iter_batches(piece, None, [column], 65536):
            names.update(partition_name(v) for v in pc.unique(batch.column(0)).to_pylist())
    return names


def file_name(index: int) -> str:
    """The name of output file `index` (without directory or suffix)."""
    return f"part-{index:05d}"
