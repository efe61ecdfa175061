"""Parquet in and out: streaming reads of one unit, the output schema, and atomically published part files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nerbatch.errors import NerbatchError
from nerbatch.storage import Location

ENTITY = pa.struct(
    [("start", pa.int32()), ("end", pa.int32()), ("label", pa.string()), ("text", pa.string()), ("score", pa.float32())]
)
ENTITIES = pa.list_(ENTITY)
SOURCE_FIELDS = [pa.field("source_file", pa.string()), pa.field("row_index", pa.int64())]


class InputError(NerbatchError):
    """Input that cannot be annotated; the message names the file (and column)."""


@dataclass(frozen=True)
class Undecodable:
    """A string cell whose bytes are not UTF-8 (Parquet writers need not check, nor do its readers)."""

    reason: str


def text_values(column: pa.Array) -> list:
    """The cells of a text column as Python values; a string cell that is not valid UTF-8 becomes
    an `Undecodable` (flagged on its own row) instead of failing the whole unit."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_cell(column, i) for i in range(len(column))]


def _cell(column: pa.Array, i: int):
    try:
        return column[i].as_py()
    except UnicodeDecodeError as exc:
        return Undecodable(f"byte {exc.object[exc.start]:#04x} at byte offset {exc.start}")


def open_parquet(location: Location) -> pq.ParquetFile:
    """Open a Parquet file (footer only), turning any failure into an `InputError` naming the file."""
    try:
        return pq.ParquetFile(location.path, filesystem=location.fs)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...; fsspec its own errors
        raise InputError(f"{location}: not a readable Parquet file ({exc})") from exc


def iter_batches(
    location: Location, row_group: int | None, columns: list[str] | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Stream `columns` (None: all) of one row group (or the whole file) in batches of `batch_rows` rows."""
    source = pq.ParquetFile(location.path, filesystem=location.fs)
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
    """Writes one unit's piece under a temporary name; `publish()` moves it into place.

    A run killed mid-unit leaves only the temporary file, which the rerun overwrites: nothing reads
    a half-written piece.
    """

    def __init__(self, final: Location, temporary: Location, schema: pa.Schema):
        self.final, self.temporary, self.schema = final, temporary, schema
        temporary.make_parent()
        self.writer = pq.ParquetWriter(temporary.path, schema, compression="zstd", filesystem=temporary.fs)

    def write(self, columns: dict[str, list]) -> None:
        """Append rows given as column lists (keys = schema field names)."""
        arrays = [_array(columns[f.name], f.type) for f in self.schema]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def publish(self) -> None:
        """Close and move the piece to its final name."""
        self.writer.close()
        self.temporary.move_to(self.final)

    def abandon(self) -> None:
        """Close and delete the temporary file (after a failure)."""
        try:
            self.writer.close()
        finally:
            self.temporary.remove()


def _array(values, kind: pa.DataType) -> pa.Array:
    """An Arrow array of `kind` from a Python list or an Arrow array (copied input columns)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values if isinstance(values, pa.Array) else from_pylist(values, kind)


# Numeric Arrow types of the output and their numpy twins.
_NUMPY = {pa.int32(): np.int32, pa.int64(): np.int64, pa.float32(): np.float32, pa.float64(): np.float64}


def from_pylist(values: list, kind: pa.DataType) -> pa.Array:
    """`pa.array(values, type=kind)` for the output's types (numbers, strings, lists of structs),
    built from buffers.

    `pa.array` on a Python list first asks whether it is a pandas object, which imports pandas: time
    and memory in every annotate process for a library nerbatch never uses. None is null. Other
    types, and null lists or structs (the output has none), fall back to `pa.array`: the same
    result, with the pandas import."""
    count = len(values)
    missing = [v is None for v in values]
    nulls = sum(missing)
    validity = pa.py_buffer(np.packbits(~np.array(missing, dtype=bool), bitorder="little")) if nulls else None
    if kind in _NUMPY:
        data = np.array([0 if v is None else v for v in values], dtype=_NUMPY[kind])
        return pa.Array.from_buffers(kind, count, [validity, pa.py_buffer(data)], null_count=nulls)
    if kind == pa.string():
        encoded = [b"" if v is None else v.encode() for v in values]
        return pa.Array.from_buffers(
            kind, count, [validity, pa.py_buffer(_offsets(encoded)), pa.py_buffer(b"".join(encoded))], null_count=nulls
        )
    if pa.types.is_list(kind) and not nulls:
        offsets = pa.Array.from_buffers(pa.int32(), count + 1, [None, pa.py_buffer(_offsets(values))])
        items = from_pylist([item for value in values for item in value], kind.value_type)
        return pa.ListArray.from_arrays(offsets, items, type=kind)
    if pa.types.is_struct(kind) and not nulls:
        fields = list(kind)
        children = [from_pylist([value[f.name] for value in values], f.type) for f in fields]
        return pa.StructArray.from_arrays(children, fields=fields)
    return pa.array(values, type=kind)


def _offsets(sequences: list) -> np.ndarray:
    """Arrow's int32 offsets of a list of sequences: 0, then the running total of their lengths."""
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sequences], out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # never silently wrap around
        raise NerbatchError(f"{offsets[-1]} bytes or items in one output column of one chunk: over Arrow's 2 GiB limit")
    return offsets.astype(np.int32)


def read_batches(path: Location, columns: list[str], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """`columns` of a Parquet file in record batches (memory stays flat however large the file);
    a missing column is an `InputError` naming the file, as when someone put a file in OUT_DIR."""
    source = open_parquet(path)
    missing = [c for c in columns if c not in source.schema_arrow.names]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(source.schema_arrow.names)}); "
            "it is not a `nerbatch annotate` output file"
        )
    yield from source.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
