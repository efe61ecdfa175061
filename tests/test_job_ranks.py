"""The annotate job as real processes: 1 vs 2 ranks under `accelerate launch` on CPU, and SIGKILL then rerun.

The kill test uses the test-only hook `NERBATCH_TEST_SLOW_BATCH_S` (see `nerbatch.job.SLOW_ENV`):
the job sleeps after writing each record batch, so the kill lands while a part is half written.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nerbatch.dist import launch_command

from helpers import all_gone, children, environment, free_port, reuters_corpus

pytestmark = pytest.mark.slow


def command(model: Path, corpus: Path, out: Path, uris: bool = False) -> list[str]:
    scheme = "file://" if uris else ""
    return [
        "-m",
        "nerbatch",
        "annotate",
        str(model),
        f"{scheme}{corpus}",
        "--output",
        f"{scheme}{out}",
        "--max-length",
        "64",
        "--read-rows",
        "8",
        "--id-column",
        "doc_id",
        "--no-progress",
    ]


def rows(out: Path) -> list[dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet")))
    return table.sort_by("doc_id").to_pylist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """150 Reuters rows in 5 row groups plus a one-group file: 6 units, uneven over 2 ranks."""
    return reuters_corpus(tmp_path_factory.mktemp("launch-corpus"), 1000)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    done = subprocess.run(
        [sys.executable, *command(tiny_model_dir, corpus, out)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out


def test_two_processes_give_the_rows_of_one(tiny_model_dir, corpus, uninterrupted, tmp_path):
    out = tmp_path / "out"
    # In accelerate 1.x `launch --cpu --num_processes 2` starts ONE process (its simple launcher; only
    # mpirun gives several). `--multi_gpu` on a machine without GPUs goes through torchrun and starts
    # two, which form a gloo group on CPU; the job checks that the launcher and accelerate agree.
    done = subprocess.run(
        [*launch_command(2, free_port()), *command(tiny_model_dir, corpus, out)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0:" in done.stderr and "rank 1:" in done.stderr  # both ranks did work
    assert len(list((out / "_nerbatch" / "stats").glob("rank-*-of-00002.json"))) == 2
    markers = [json.loads(p.read_text()) for p in (out / "_nerbatch" / "done").glob("*.json")]
    assert {m["rank"] for m in markers} == {0, 1} and all(m["at"] > 0 for m in markers)  # who did each unit, when
    one, two = rows(uninterrupted), rows(out)
    assert len(two) == 180 and [r["doc_id"] for r in two] == [r["doc_id"] for r in one]
    assert two == one
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in uninterrupted.glob("*.parquet"))


def test_an_out_dir_local_to_each_node_is_refused_before_any_work(tiny_model_dir, corpus, tmp_path):
    # `NERBATCH_TEST_PRIVATE_OUT` gives rank 1 its own copy of OUT_DIR, as a local disk on another node would.
    out, private = tmp_path / "out", tmp_path / "node-b"
    done = subprocess.run(
        [*launch_command(2, free_port()), *command(tiny_model_dir, corpus, out)],
        env={**environment(), "NERBATCH_TEST_PRIVATE_OUT": str(private)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    # rank 0 judges, and both ranks stop with its message (neither is left waiting for the other)
    assert done.stderr.count(f"{out} is not shared between rank 0 (") == 2, done.stderr[-3000:]
    assert ") and rank 1 on " in done.stderr
    assert "use a shared filesystem or an object store URI" in done.stderr
    assert not list(out.glob("*.parquet")) and not list(private.rglob("*.parquet"))
    assert not list((out / "_nerbatch" / "done").glob("*.json"))


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the job"
        time.sleep(0.05)


@pytest.mark.parametrize("uris", [False, True], ids=["paths", "file-uris"])
def test_sigkill_mid_unit_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, corpus, uninterrupted, tmp_path, uris):
    out = tmp_path / "out"
    argv = [sys.executable, *command(tiny_model_dir, corpus, out, uris)]
    markers = out / "_nerbatch" / "done"
    for kill in range(2):  # killed twice, at different points, then run to completion
        job = subprocess.Popen(
            argv,
            env=environment(NERBATCH_TEST_SLOW_BATCH_S="0.2"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda done=kill: markers.exists() and len(list(markers.glob("*.json"))) > done)
        wait_for(lambda: any((out / "_nerbatch" / "tmp").glob("*.parquet")))  # the next piece is half written
        job.send_signal(signal.SIGKILL)
        assert job.wait() == -signal.SIGKILL
        assert not list(out.rglob("part-*.parquet"))  # readers see no output file before it is whole
        assert any((out / "_nerbatch" / "tmp").glob("*.parquet"))
        assert not (out / "_nerbatch" / "stats.json").exists()
        for piece in (out / "_nerbatch" / "pieces").glob("*.parquet"):  # every published piece is whole
            assert pq.read_table(piece).num_rows > 0
    done = subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert rows(out) == rows(uninterrupted)
    assert (out / "_nerbatch" / "stats.json").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_ranks_stop_when_the_launcher_is_killed_and_a_rerun_completes(tiny_model_dir, corpus, uninterrupted, tmp_path):
    """torchrun starts each rank in a session of its own: SIGKILL of the launcher alone left both
    ranks running, and a rerun collided with them (chaos run). Now they stop within seconds."""
    out = tmp_path / "out"
    argv = [*launch_command(2, free_port()), *command(tiny_model_dir, corpus, out)]
    launcher = subprocess.Popen(
        argv,
        env=environment(NERBATCH_TEST_SLOW_BATCH_S="0.2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(list((out / "_nerbatch" / "done").glob("*.json"))) >= 1)
    ranks = children(launcher.pid)
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    assert all_gone(ranks, 20)
    assert "the launcher" in launcher.stderr.read() and not (out / "_nerbatch" / "stats.json").exists()
    rerun = [*launch_command(2, free_port()), *command(tiny_model_dir, corpus, out)]
    done = subprocess.run(rerun, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(out) == rows(uninterrupted)
