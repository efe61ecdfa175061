"""The multi-node probe's checks, with two run directories standing for two nodes' views of OUT_DIR."""

from __future__ import annotations

import pytest

from nerbatch.engines import probe
from nerbatch.parquet_io import InputError
from nerbatch.rundir import RunDir


def test_a_shared_out_dir_passes_and_a_local_one_is_refused_on_either_side(tmp_path):
    shared = RunDir(str(tmp_path / "out"))
    probe.leave_token(shared, "t", probe.MAIN)
    answer = probe.answer(shared, "t", "rank-1")
    assert answer["saw_main"] and answer["main_host"] == probe.node_facts()["host"]
    probe.check_workers(shared, "t", {"rank-1": answer}, "rank 0")  # passes

    elsewhere = RunDir(str(tmp_path / "node-b" / "out"))  # the same path on another node's disk
    alone = probe.answer(elsewhere, "t", "rank-2")
    assert not alone["saw_main"]
    with pytest.raises(InputError, match=r"is not shared between rank 0 \(.+\) and rank-2 on "):
        probe.check_workers(shared, "t", {"rank-2": alone}, "rank 0")

    # a worker that saw a stale main token on its own disk: the main process does not see its token
    probe.leave_token(elsewhere, "t", probe.MAIN)
    stale = probe.answer(elsewhere, "t", "rank-3")
    assert stale["saw_main"]
    with pytest.raises(InputError, match="is not shared between"):
        probe.check_workers(shared, "t", {"rank-3": stale}, "rank 0")


def test_other_versions_on_a_node_are_refused(tmp_path):
    out = RunDir(str(tmp_path / "out"))
    probe.leave_token(out, "t", probe.MAIN)
    answer = {**probe.answer(out, "t", "actor-0"), "torch": "1.0.0"}
    with pytest.raises(InputError, match=r"actor-0 on .+ runs .+'torch': '1.0.0'.+install the same versions"):
        probe.check_workers(out, "t", {"actor-0": answer}, "the driver")


def test_a_cpu_build_of_the_same_torch_drives_gpu_workers(tmp_path):
    out = RunDir(str(tmp_path / "out"))
    probe.leave_token(out, "t", probe.MAIN)
    answer = probe.answer(out, "t", "actor-0")
    ours = probe.node_facts()
    public = ours["torch"].split("+")[0]
    probe.check_versions({**ours, "torch": f"{public}+cpu"}, {**answer, "torch": f"{public}+cu130"}, "driver", "a")
    with pytest.raises(InputError, match="install the same versions"):
        probe.check_versions(ours, {**answer, "nerbatch": "0.0.1"}, "the driver", "actor-0")
