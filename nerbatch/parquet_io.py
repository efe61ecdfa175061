"""Parquet in and out: streaming reads of one unit, the output schema, and atomically published part files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nerbatch.errors import NerbatchError

ENTITY = pa.struct(
    [("start", pa.int32()), ("end", pa.int32()), ("label", pa.string()), ("text", pa.string()), ("score", pa.float32())]
)
ENTITIES = pa.list_(ENTITY)
SOURCE_FIELDS = [pa.field("source_file", pa.string()), pa.field("row_index", pa.int64())]


class InputError(NerbatchError):
    """Input that cannot be annotated; the message names the file (and column)."""


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a Parquet file (footer only), turning any failure into an `InputError` naming the file."""
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc


def iter_batches(path: Path, row_group: int | None, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream `columns` of one row group (or the whole file) in record batches of `batch_rows` rows."""
    source = pq.ParquetFile(path)
    groups = None if row_group is None else [row_group]
    yield from source.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns, use_threads=False)


def output_schema(id_fields: list[pa.Field], metadata: dict[str, object]) -> pa.Schema:
    """Id column(s), `entities`, `error`, `n_windows`, with nerbatch key-value metadata (JSON values)."""
    fields = [
        *id_fields,
        pa.field("entities", ENTITIES),
        pa.field("error", pa.string()),
        pa.field("n_windows", pa.int32()),
    ]
    return pa.schema(fields, metadata={f"nerbatch.{k}": json.dumps(v, sort_keys=True) for k, v in metadata.items()})


class PartWriter:
    """Writes one unit's part file under a temporary name; `publish()` renames it into place atomically.

    A run killed mid-unit leaves only the temporary file, which the rerun overwrites: readers of
    OUT_DIR never see a half-written part.
    """

    def __init__(self, final: Path, temporary: Path, schema: pa.Schema):
        self.final, self.temporary, self.schema = final, temporary, schema
        temporary.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(temporary, schema, compression="zstd")

    def write(self, columns: dict[str, list]) -> None:
        """Append rows given as column lists (keys = schema field names)."""
        arrays = [_array(columns[f.name], f.type) for f in self.schema]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def publish(self) -> None:
        """Close, flush to disk and move the part to its final name."""
        self.writer.close()
        fsync_file(self.temporary)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temporary, self.final)

    def abandon(self) -> None:
        """Close and delete the temporary file (after a failure)."""
        try:
            self.writer.close()
        finally:
            self.temporary.unlink(missing_ok=True)


def _array(values, kind: pa.DataType) -> pa.Array:
    """An Arrow array of `kind` from a Python list or an Arrow array (copied input columns)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(values, type=kind)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to `path` through a temporary file and a rename, so readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync_file(temporary)
    os.replace(temporary, path)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
