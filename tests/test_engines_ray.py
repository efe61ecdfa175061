"""`nerbatch annotate --engine ray` (`nerbatch.engines.ray_actors`) on local Ray clusters: the rows of
a plain run with 1 and 3 actors, actors that die, a poison unit, a killed driver, refusals.

The driver runs in this process (click's CliRunner) against the session's cluster (`ray_address`),
except where a test kills it. Test hooks of `nerbatch.job`: `NERBATCH_TEST_EXIT_IN_UNIT` makes a
worker die in the middle of a unit, `NERBATCH_TEST_SLOW_BATCH_S` slows every chunk down.
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
from click.testing import CliRunner

from nerbatch.cli import main
from nerbatch.job import EXIT_ENV, SLOW_ENV

from conftest import DEMO_DATA
from helpers import all_gone, children, environment, nerbatch_command

pytestmark = pytest.mark.slow  # every test starts Ray processes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The 26 demo documents in 6 row groups (6 units) of one file, and 4 more in a second file."""
    rows = [json.loads(line) for line in (DEMO_DATA / "documents.jsonl").read_text(encoding="utf-8").splitlines()]
    table = pa.table({"doc_id": [r["doc_id"] for r in rows], "text": pa.array([r["text"] for r in rows], pa.string())})
    directory = tmp_path_factory.mktemp("ray-corpus")
    pq.write_table(table, directory / "a.parquet", row_group_size=5)
    pq.write_table(table.slice(0, 4), directory / "b.parquet")
    return directory


def annotate(model, corpus, out, *extra, **env) -> object:
    args = ["annotate", str(model), str(corpus), "--output", str(out), "--id-column", "doc_id", "--no-progress"]
    return CliRunner(env=env).invoke(main, [*args, "--file-rows", "12", *map(str, extra)])


def ray_run(model, corpus, out, address, *extra, **env):
    return annotate(model, corpus, out, "--engine", "ray", "--ray-address", address, *extra, **env)


def rows_of(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def without_scores(rows: list[dict]) -> list[dict]:
    """Rows with every span exact and scores left out (thread counts may move their last digits)."""
    return [{**r, "entities": [{k: v for k, v in e.items() if k != "score"} for e in r["entities"]]} for r in rows]


@pytest.fixture(scope="module")
def plain(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    result = annotate(tiny_model_dir, corpus, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("actors", [1, 3])
def test_ray_writes_the_rows_and_files_of_a_plain_run(tiny_model_dir, corpus, plain, ray_address, tmp_path, actors):
    out = tmp_path / "out"
    result = ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", actors, "--cpus-per-actor", 2 / actors)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in plain.glob("*.parquet"))
    assert without_scores(rows_of(out)) == without_scores(rows_of(plain))
    assert pq.read_schema(out / "part-00000.parquet").metadata == pq.read_schema(plain / "part-00000.parquet").metadata
    stats = json.loads(CliRunner().invoke(main, ["stats", str(out), "--json"]).output)
    assert stats["complete"] and stats["units"]["done"] == 7 and stats["rows"] == 30
    assert [(r["kind"], r["world"]) for r in stats["ranks"]] == [("actor", actors)] * actors
    assert sum(r["units"] for r in stats["ranks"]) == 7
    if actors == 3:  # --overwrite over a complete run: every unit to do again, so every actor starts
        again = ray_run(
            tiny_model_dir, corpus, out, ray_address, "--actors", 3, "--cpus-per-actor", 2 / 3, "--overwrite"
        )
        assert again.exit_code == 0, again.output
        stats = json.loads(CliRunner().invoke(main, ["stats", str(out), "--json"]).output)
        assert [(r["kind"], r["world"]) for r in stats["ranks"]] == [("actor", 3)] * 3
        assert without_scores(rows_of(out)) == without_scores(rows_of(plain))


def test_an_actor_that_dies_mid_unit_costs_an_attempt_not_a_row(tiny_model_dir, corpus, plain, ray_address, tmp_path):
    out = tmp_path / "out"
    result = ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", 2, **{EXIT_ENV: "unit-000002:1"})
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 30 and len({(r["doc_id"], r["n_windows"]) for r in rows}) == 26  # b.parquet repeats 4 ids
    assert without_scores(rows) == without_scores(rows_of(plain))
    assert not list((out / "_nerbatch" / "tmp").glob("**/*.parquet"))


def test_a_unit_that_kills_every_actor_is_capped_and_the_others_finish(
    tiny_model_dir, corpus, plain, ray_address, tmp_path
):
    out = tmp_path / "out"
    result = ray_run(
        tiny_model_dir, corpus, out, ray_address, "--actors", 2, "--max-attempts", 2, **{EXIT_ENV: "unit-000003"}
    )
    assert result.exit_code == 1
    assert "1 unit(s) failed" in result.output and "unit-000003" in result.output
    failure = json.loads((out / "_nerbatch" / "failed" / "unit-000003.json").read_text())
    assert "its actor died on all 2 attempts" in failure["error"]
    stats = json.loads(CliRunner().invoke(main, ["stats", str(out), "--json"]).output)
    assert (stats["units"]["done"], stats["units"]["failed"], stats["complete"]) == (6, 1, False)
    # the same command without the poison finishes the run: the rows of the plain run
    assert ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", 2).exit_code == 0
    assert without_scores(rows_of(out)) == without_scores(rows_of(plain))


def test_another_model_or_options_are_refused(tiny_model_dir, corpus, plain, ray_address, tmp_path):
    out = tmp_path / "out"
    assert ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", 1).exit_code == 0
    result = ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", 1, "--aggregation", "max")
    assert result.exit_code == 1 and 'option aggregation: was "first", now "max"' in result.output


def test_a_killed_driver_leaves_no_process_and_any_engine_finishes_its_run(tiny_model_dir, corpus, plain, tmp_path):
    """The driver starts its own local cluster; SIGKILL ends the cluster and the actors with it, and
    the run is finished by the ranks engine (and would be by Ray: the run config records no engine)."""
    out = tmp_path / "out"
    args = ["annotate", str(tiny_model_dir), str(corpus), "--output", str(out), "--id-column", "doc_id"]
    args += ["--no-progress", "--file-rows", "12", "--engine", "ray", "--actors", "1"]
    driver = subprocess.Popen(nerbatch_command(args), env=environment(**{SLOW_ENV: "1"}), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "_nerbatch" / "done").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list((out / "_nerbatch" / "done").glob("*.json")), "no unit finished in 2 minutes"
        family = descendants(driver.pid)
        assert len(family) >= 3  # the local cluster's processes and the actor
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        # the actor, the raylet and the GCS go at once; Ray's per-node agents notice within a minute or so
        assert all_gone(family, 120), f"left running: {[p for p in family if Path(f'/proc/{p}').exists()]}"
    finally:
        if driver.poll() is None:
            driver.kill()
    assert annotate(tiny_model_dir, corpus, out).exit_code == 0
    assert without_scores(rows_of(out)) == without_scores(rows_of(plain))


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        kids = [k for p in frontier for k in children(p)]
        found += kids
        frontier = kids
    return found


def test_a_ranks_run_is_finished_by_ray(tiny_model_dir, corpus, plain, ray_address, tmp_path):
    out = tmp_path / "out"
    args = ["annotate", str(tiny_model_dir), str(corpus), "--output", str(out), "--id-column", "doc_id"]
    args += ["--no-progress", "--file-rows", "12"]
    env = environment(**{EXIT_ENV: "unit-000004"})  # the process dies in its fifth unit
    assert subprocess.run(nerbatch_command(args), env=env, capture_output=True).returncode == 137
    assert len(list((out / "_nerbatch" / "done").glob("*.json"))) == 4
    assert ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", 2).exit_code == 0
    assert without_scores(rows_of(out)) == without_scores(rows_of(plain))


# Two simulated nodes in a process of their own (a cluster's shutdown ends its process group): the
# head has no CPU, so the actor runs on the second node, whose environment gives it a directory of
# its own where the driver sees OUT_DIR (`NERBATCH_TEST_PRIVATE_OUT`), as a local disk on each node does.
TWO_NODES = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20})
cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20, env_vars={"NERBATCH_TEST_PRIVATE_OUT": sys.argv[1]})
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


def test_an_output_directory_other_nodes_cannot_see_is_refused(tiny_model_dir, corpus, tmp_path):
    nodes = subprocess.Popen(
        [sys.executable, "-c", TWO_NODES, str(tmp_path / "node-b")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        address = nodes.stdout.readline().strip()
        out = tmp_path / "out"
        result = ray_run(tiny_model_dir, corpus, out, address, "--actors", 1)
        assert result.exit_code == 1, result.output
        assert f"{out} is not shared between the driver" in result.output and "use a shared filesystem" in result.output
        assert not list(out.glob("*.parquet")) and not (out / "_nerbatch" / "done").exists()
        assert list((tmp_path / "node-b").rglob("actor-0.json"))  # the actor wrote where only its node sees
    finally:
        nodes.stdin.close()
        nodes.wait(60)


def test_bad_ray_settings_are_one_line_before_any_work(
    tiny_model_dir, corpus, ray_address, tmp_path, monkeypatch, capfd
):
    with capfd.disabled():  # Ray's driver hangs on output captured at the file descriptor (pytest's default)
        out = tmp_path / "out"
        began = time.monotonic()
        unreachable = ray_run(tiny_model_dir, corpus, out, "127.0.0.1:1")
        assert (
            unreachable.exit_code == 1
            and "--ray-address 127.0.0.1:1: no Ray cluster answers there" in unreachable.output
        )
        assert time.monotonic() - began < 15
        no_gpu = ray_run(tiny_model_dir, corpus, out, ray_address, "--gpus-per-actor", 1)
        assert no_gpu.exit_code == 1 and "--gpus-per-actor 1: the cluster has no GPU (2 CPUs" in no_gpu.output
        launched = ray_run(tiny_model_dir, corpus, out, ray_address, WORLD_SIZE="2", LOCAL_RANK="0")
        assert launched.exit_code == 1 and "not under accelerate launch or torchrun" in launched.output
        too_many = ray_run(tiny_model_dir, corpus, out, ray_address, "--actors", 3)
        assert too_many.exit_code == 1 and "--actors 3: 3 x 1 CPUs = 3 CPUs, the cluster has 2" in too_many.output
        ranks_only = annotate(tiny_model_dir, corpus, out, "--actors", 2)
        assert ranks_only.exit_code == 2 and "--actors is for --engine ray" in ranks_only.output
        monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
        missing = ray_run(tiny_model_dir, corpus, out, ray_address)
        assert missing.exit_code == 1 and "pip install 'nerbatch[ray]'" in missing.output
        assert not out.exists()  # nothing was written
