"""`nerbatch.rundir`: OUT_DIR claimed or checked against the run config, foreign files refused,
ranks waiting for each other."""

from __future__ import annotations

import time

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


def test_waiting_for_other_ranks_ends_when_their_units_settle_or_gives_up_on_silence(tmp_path):
    from nerbatch.rundir import wait_for_other_ranks
    from nerbatch.shards import Unit

    out = RunDir(locate(tmp_path / "out"))
    units = [Unit(i, "a.parquet", i, 10 * i, 10) for i in range(3)]
    mine = {units[0]}
    started = time.time()
    assert not wait_for_other_ranks(out, units, mine, started, poll=0.01, stall=0.2)  # nobody works: give up
    out.mark_done(units[1], {})
    out.mark_failed(units[2], "an earlier run's failure")
    (out.meta / "failed" / "unit-000002.json").write_json({"error": "old", "at": started - 60})
    assert not wait_for_other_ranks(out, units, mine, started, poll=0.01, stall=0.2)  # a stale failure is not news
    out.mark_failed(units[2], "this run's failure")
    assert wait_for_other_ranks(out, units, mine, started, poll=0.01, stall=0.2)


def test_hidden_files_and_hadoop_markers_in_partitions_are_not_foreign(tmp_path):
    out = RunDir(locate(tmp_path / "out"))
    config = {"model": "m", "options": {}, "inputs": [["a", None, 3]]}
    out.prepare(config, overwrite=False)
    (tmp_path / "out" / "lang=en").mkdir()
    for name in ("part-00000.parquet", ".part-00000.parquet.crc", "_SUCCESS"):
        (tmp_path / "out" / "lang=en" / name).write_bytes(b"x")
    (tmp_path / "out" / "lang=en_$folder$").write_bytes(b"")
    out.prepare(config, overwrite=False)  # resumes
