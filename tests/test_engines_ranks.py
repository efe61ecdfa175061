"""`nerbatch.engines.ranks`: how ranks wait for each other through OUT_DIR."""

from __future__ import annotations

import time

from nerbatch.engines.ranks import wait_for_other_ranks
from nerbatch.rundir import RunDir
from nerbatch.storage import locate


def test_waiting_for_other_ranks_ends_when_their_units_settle_or_gives_up_on_silence(tmp_path):
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
