"""`nerbatch.shards`: inputs discovered, units numbered by the inputs alone, shares of units per rank."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nerbatch.parquet_io import InputError
from nerbatch.shards import discover_inputs, plan_units, units_for_rank
from nerbatch.storage import locate


def write_parquet(path: Path, rows: int, row_group: int | None = None, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": [f"text {i}" for i in range(rows)], **columns})
    pq.write_table(table, path, row_group_size=row_group)
    return path


def test_inputs_are_discovered_sorted_without_hidden_files_or_the_output(tmp_path):
    b = write_parquet(tmp_path / "in" / "b.parquet", 3)
    a = write_parquet(tmp_path / "in" / "sub" / "a.parquet", 3)
    write_parquet(tmp_path / "in" / ".hidden" / "c.parquet", 3)
    write_parquet(tmp_path / "in" / "_tmp" / "d.parquet", 3)
    write_parquet(tmp_path / "in" / "out" / "part-000000.parquet", 3)  # an OUT_DIR inside the input directory
    found = discover_inputs([str(tmp_path / "in"), str(b)], exclude=locate(tmp_path / "in" / "out"))
    assert [f.uri for f in found] == sorted([str(a.resolve()), str(b.resolve())])
    assert [f.uri for f in discover_inputs([str(tmp_path / "in" / "*.parquet")])] == [str(b.resolve())]
    assert [f.uri for f in discover_inputs([f"file://{tmp_path}/in/**/a.parquet"])] == [str(a.resolve())]
    with pytest.raises(InputError, match="no such file"):
        discover_inputs([str(tmp_path / "missing")])


def test_units_are_row_groups_numbered_in_a_fixed_order(tmp_path):
    one = write_parquet(tmp_path / "a.parquet", 10, row_group=4)  # 3 row groups
    two = write_parquet(tmp_path / "b.parquet", 5)  # 1 row group: the whole file
    units = plan_units([locate(one), locate(two)], ["text"])
    assert [(u.index, Path(u.path).name, u.row_group, u.first_row, u.rows) for u in units] == [
        (0, "a.parquet", 0, 0, 4),
        (1, "a.parquet", 1, 4, 4),
        (2, "a.parquet", 2, 8, 2),
        (3, "b.parquet", None, 0, 5),
    ]
    assert [u.index for u in units_for_rank(units, 1, 3)] == [1]
    assert sorted(u.index for r in range(3) for u in units_for_rank(units, r, 3)) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="no column 'body'"):
        plan_units([locate(one)], ["body"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        plan_units([locate(tmp_path / "bad.parquet")], ["text"])
