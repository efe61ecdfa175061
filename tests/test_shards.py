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


def units_of(rows: list[int], row_groups: bool = True) -> list:
    from nerbatch.shards import Unit

    return [Unit(i, f"/d/part-{i}.parquet", 0 if row_groups else None, 0, n) for i, n in enumerate(rows)]


def test_a_row_group_that_would_hold_up_the_run_is_named_once(capsys):
    from nerbatch.shards import huge_row_group_warning, warn_about_units

    assert huge_row_group_warning(units_of([20_000] * 7 + [1_000_000])) is not None
    message = huge_row_group_warning(units_of([20_000] * 7 + [1_000_000], row_groups=False))
    assert message.startswith("nerbatch annotate: warning: /d/part-7.parquet (one row group) holds 1,000,000 rows, ")
    assert "88% of the input and 50 times the median row group (20,000 rows)" in message
    assert "docs/running-at-scale.md#row-groups-and-units" in message
    assert huge_row_group_warning(units_of([20_000] * 6 + [1_000_000])) is None  # 7 units: too few to judge
    assert huge_row_group_warning(units_of([1_000] * 20 + [9_999])) is None  # not big enough to matter
    assert huge_row_group_warning(units_of([20_000] * 100 + [200_000])) is None  # 9% of the rows
    assert huge_row_group_warning(units_of([20_000] * 10 + [80_000])) is None  # 4 times the median
    assert huge_row_group_warning(units_of([20_000] * 10 + [80_001])) is not None
    warn_about_units(units_of([20_000] * 10))
    assert capsys.readouterr().err == ""
    warn_about_units(units_of([20_000] * 10 + [500_000, 400_000]))
    assert capsys.readouterr().err.count("warning:") == 1


def test_thousands_of_input_arguments_are_named_as_the_shell_expanding_a_pattern():
    from nerbatch.shards import shell_expanded_warning

    assert shell_expanded_warning([f"/data/dump/p{i}.parquet" for i in range(1000)]) is None
    one_directory = shell_expanded_warning([f"/data/dump/p{i}.parquet" for i in range(1001)])
    assert "the shell passed 1,001 input paths; pass their directory (/data/dump/) or a quoted glob " in one_directory
    assert "('/data/dump/*.parquet')" in one_directory
    here = shell_expanded_warning([f"p{i}.parquet" for i in range(1001)])
    assert "pass their directory (./) or a quoted glob ('*.parquet')" in here
    spread = shell_expanded_warning([f"/data/dump/{i % 7}/p{i}.parquet" for i in range(2000)])
    assert "pass a directory holding them (/data/dump/ is searched recursively) or a quoted glob" in spread
