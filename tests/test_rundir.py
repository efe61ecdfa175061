"""`nerbatch.rundir`: OUT_DIR claimed or checked against the run config, foreign files refused,
ranks waiting for each other."""

from __future__ import annotations

import pytest

from nerbatch.parquet_io import InputError
from nerbatch.rundir import RunDir
from nerbatch.storage import locate


def test_run_dir_refuses_another_run_and_foreign_files(tmp_path):
    out = RunDir(locate(tmp_path / "out"))
    config = {"model": "m", "options": {"stride": 8}, "inputs": [["a", None, 3]]}
    out.prepare(config, overwrite=False)
    out.prepare(config, overwrite=False)  # the same run resumes
    with pytest.raises(InputError, match="different run .option stride: was 8, now 16"):
        out.prepare({**config, "options": {"stride": 16}}, overwrite=False)
    with pytest.raises(InputError, match="same command"):
        out.check({**config, "model": "other"})
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / "out" / "lang=en").mkdir()
    (tmp_path / "out" / "lang=en" / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / "out" / "spark").mkdir()  # not ours: output files beside it would be read with it
    (tmp_path / "out" / "spark" / "part-00000-1f2e.snappy.parquet").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"holds files that `nerbatch annotate` did not write \(spark\)"):
            out.prepare({**config, "model": "other"}, overwrite=overwrite)
    assert sorted(c.name for c in out.root.children()) == ["_nerbatch", "lang=en", "part-00000.parquet", "spark"]
    (tmp_path / "out" / "spark" / "part-00000-1f2e.snappy.parquet").unlink()
    (tmp_path / "out" / "spark").rmdir()
    out.prepare({**config, "model": "other"}, overwrite=True)  # --overwrite clears files and bookkeeping
    assert sorted(c.name for c in out.root.children()) == ["_nerbatch"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not write \\(notes.txt\\); choose an empty or new --output directory$"):
        RunDir(locate(foreign)).prepare(config, overwrite=False)


def test_hidden_files_and_hadoop_markers_in_partitions_are_not_foreign(tmp_path):
    out = RunDir(locate(tmp_path / "out"))
    config = {"model": "m", "options": {}, "inputs": [["a", None, 3]]}
    out.prepare(config, overwrite=False)
    (tmp_path / "out" / "lang=en").mkdir()
    for name in ("part-00000.parquet", ".part-00000.parquet.crc", "_SUCCESS"):
        (tmp_path / "out" / "lang=en" / name).write_bytes(b"x")
    (tmp_path / "out" / "lang=en_$folder$").write_bytes(b"")
    out.prepare(config, overwrite=False)  # resumes
