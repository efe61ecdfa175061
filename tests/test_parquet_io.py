"""`nerbatch.parquet_io`: parts published atomically, output arrays built from Python lists."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nerbatch.errors import NerbatchError
from nerbatch.parquet_io import PartWriter, output_schema
from nerbatch.storage import locate


def test_part_is_invisible_until_published_and_abandon_leaves_nothing(tmp_path):
    schema = output_schema([pa.field("id", pa.int64())], {"version": "test"})
    final, temporary = tmp_path / "part-000000.parquet", tmp_path / "tmp" / "part-000000.rank0.parquet"
    writer = PartWriter(locate(final), locate(temporary), schema)
    writer.write({"id": [1, 2], "entities": [[], []], "error": [None, "empty text"], "n_windows": [1, 0]})
    assert temporary.exists() and not final.exists()
    writer.publish()
    assert final.exists() and not temporary.exists()
    assert pq.read_table(final)["error"].to_pylist() == [None, "empty text"]
    other = PartWriter(
        locate(tmp_path / "part-000001.parquet"), locate(tmp_path / "tmp" / "part-000001.rank0.parquet"), schema
    )
    other.write({"id": [3], "entities": [[]], "error": [None], "n_windows": [1]})
    other.abandon()
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == ["part-000000.parquet"]


def test_output_arrays_from_python_lists_equal_pyarrows_own():
    """`from_pylist` (buffers, no pandas import) builds what `pa.array` builds, nulls and non-ASCII included."""
    from nerbatch.parquet_io import ENTITIES, from_pylist

    entities = [
        [],
        [{"start": 0, "end": 3, "label": "PER", "text": "Zoë", "score": 0.5}],
        [
            {"start": 5, "end": 8, "label": "LOC", "text": "東京都", "score": 0.25},
            {"start": 9, "end": 9, "label": "MISC", "text": "", "score": 1.0},
        ],
        [],
    ]
    cases = [
        (entities, ENTITIES),
        ([None, "a", "ü€", None, ""], pa.string()),
        ([3, None, -1], pa.int32()),
        ([0, 2**40], pa.int64()),
        ([0.5, None], pa.float32()),
        ([], pa.string()),
        ([[]], ENTITIES),
    ]
    for values, kind in cases:
        built = from_pylist(values, kind)
        built.validate(full=True)
        assert built.equals(pa.array(values, type=kind)), (values, kind)
        assert built.to_pylist() == values


def test_offsets_past_arrows_int32_limit_are_an_error():
    from nerbatch.parquet_io import _offsets

    assert _offsets([b"ab", b"", b"c"]).tolist() == [0, 2, 2, 3]
    with pytest.raises(NerbatchError, match="2 GiB"):
        _offsets([range(2**31)])  # a range has a length without the memory
