"""`annotate --workers N` (nerbatch.serve): this process runs the model, spawned workers do the rest.

The output must be the rows an in-process run writes, a failing unit must fail alone, and a worker
killed mid-unit must cost only its unit, which a rerun redoes (test hook: `NERBATCH_TEST_SLOW_BATCH_S`,
see tests/test_annotate_launch.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForTokenClassification, AutoTokenizer

from nerbatch.cli import main
from nerbatch.inference import Annotator
from nerbatch.modeling import ModelError
from nerbatch.serve import GONE, ServerClient

from helpers import all_gone, environment, good_and_corrupt_inputs, reuters_corpus, running

OPTIONS = ["--max-length", "64", "--read-rows", "8", "--id-column", "doc_id", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """180 Reuters rows (some null) in 6 row groups over two files: 6 units."""
    return reuters_corpus(tmp_path_factory.mktemp("serve-corpus"), 2000)


def annotate(model: Path, inputs: Path, out: Path, *extra) -> object:
    args = ["annotate", str(model), str(inputs), "--output", str(out), *OPTIONS, *map(str, extra)]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def rows(out: Path) -> list[dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet")))
    return table.sort_by("doc_id").to_pylist()


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("in-process") / "out"
    assert annotate(tiny_model_dir, corpus, out).exit_code == 0
    return out


def test_workers_write_the_rows_of_one_process(tiny_model_dir, corpus, in_process, tmp_path):
    out = tmp_path / "out"
    result = annotate(tiny_model_dir, corpus, out, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert rows(out) == rows(in_process)
    assert len(rows(out)) == 180 and sum(r["error"] is None for r in rows(out)) > 120
    served = json.loads((out / "_nerbatch" / "stats" / "server-rank-00000.json").read_text())
    assert served["workers"] == 2 and served["batches"] > 6
    markers = [json.loads(p.read_text()) for p in (out / "_nerbatch" / "done").glob("*.json")]
    assert len(markers) == 6 and served["pid"] not in {m["pid"] for m in markers}  # the workers did the units
    stats = json.loads((out / "_nerbatch" / "stats.json").read_text())
    expected = json.loads((in_process / "_nerbatch" / "stats.json").read_text())
    counts = ("rows", "docs", "flagged", "tokens", "windows", "entities", "units")
    assert {k: stats[k] for k in counts} == {k: expected[k] for k in counts}
    # the workers' tallies reached this process (what the command prints)
    assert "180 rows" in result.output


def test_a_corrupt_file_fails_its_unit_only_with_workers(tiny_model_dir, corpus, tmp_path):
    table = pq.read_table(corpus / "b.parquet")
    inputs = good_and_corrupt_inputs(table, tmp_path)
    out = tmp_path / "out"
    result = annotate(tiny_model_dir, inputs, out, "--workers", 2)
    assert result.exit_code != 0
    assert "zcorrupt.parquet" in result.output and "1 unit(s) failed" in result.output
    assert (out / "_nerbatch" / "done" / "unit-000000.json").exists()
    assert (out / "_nerbatch" / "failed" / "unit-000001.json").exists()
    pq.write_table(table, inputs / "zcorrupt.parquet", compression="zstd")  # the input is repaired
    assert annotate(tiny_model_dir, inputs, out, "--workers", 2).exit_code == 0
    assert pq.read_table(out / "part-00000.parquet")["doc_id"].to_pylist() == table["doc_id"].to_pylist() * 2


def worker_pids(parent: int) -> list[int]:
    """The spawned worker processes of `parent` (not multiprocessing's resource tracker)."""
    found = []
    for pid in map(int, Path(f"/proc/{parent}/task/{parent}/children").read_text().split()):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except FileNotFoundError:
            continue
    return found


def writing_a_piece(pid: int) -> bool:
    """Whether process `pid` has a piece open under the run's temporary folder (half way through a
    unit: not yet published, so not yet done)."""
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except (FileNotFoundError, PermissionError):
        return False
    return any("/_nerbatch/tmp/" in link for link in links)


@pytest.mark.slow
@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="needs Linux /proc")
def test_a_killed_worker_costs_its_unit_and_a_rerun_completes(tiny_model_dir, corpus, in_process, tmp_path):
    from test_annotate_launch import wait_for

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "nerbatch", "annotate", str(tiny_model_dir), str(corpus), "--output", str(out)]
    argv += [*OPTIONS, "--workers", "2"]
    job = subprocess.Popen(
        argv, env=environment(NERBATCH_TEST_SLOW_BATCH_S="0.2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    victims = []
    wait_for(lambda: victims.extend(p for p in worker_pids(job.pid) if writing_a_piece(p)) or victims)
    subprocess.run(["kill", "-KILL", str(victims[0])], check=True)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0
    assert f"exited with code {-signal.SIGKILL} while annotating it" in stderr.decode()
    failed = [json.loads(p.read_text()) for p in (out / "_nerbatch" / "failed").glob("*.json")]
    done = list((out / "_nerbatch" / "done").glob("*.json"))
    assert len(failed) == 1 and len(done) == 5  # the other worker took every other unit
    rerun = subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rows(out) == rows(in_process)


class Sent(list):
    """A stand-in for a worker's requests pipe: what was sent, in order."""

    def send(self, message: tuple) -> None:
        self.append(message)


def test_replies_are_matched_to_batches_in_order_and_errors_raise(tiny_model_dir):
    """A worker's replies come in the order its batches went; a reply that says the model process
    failed raises `ModelError`; asking for the next unit first reads the replies of batches nobody
    waits for any more (their unit failed half way)."""
    requests, replies = Sent(), queue.Queue()
    client = ServerClient(requests, replies)
    batches = [client.submit(np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64)) for _ in range(3)]
    assert [m[0] for m in requests] == ["batch"] * 3
    for k in range(2):
        replies.put(("probs", np.full((1, 4, 2), k, np.float32), k == 1))
    replies.put(("error", "OutOfMemoryError: CUDA out of memory"))
    probs, rerun = batches[1].result()  # batch 0's reply is taken on the way
    assert probs[0, 0, 0] == 1 and rerun
    assert batches[0].result()[0][0, 0, 0] == 0
    with pytest.raises(ModelError, match="out of memory"):
        batches[2].result()

    abandoned = client.submit(np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64))
    replies.put(("probs", np.zeros((1, 4, 2), np.float32), False))
    replies.put(("unit", "the next unit"))
    assert client.next_unit() == "the next unit" and requests[-1] == ("next",)
    assert abandoned.reply[0] == "probs" and not client.waiting

    model = AutoModelForTokenClassification.from_pretrained(tiny_model_dir)
    copy = pickle.loads(pickle.dumps(Annotator(model, AutoTokenizer.from_pretrained(tiny_model_dir))))
    assert copy.model is None and copy.encode(["Peter lives in Berlin."])[0].n_tokens > 0
    with pytest.raises(ModelError, match="without its model"):
        copy.run_batch(torch.zeros((1, 4), dtype=torch.long), torch.ones((1, 4), dtype=torch.long))


def test_a_worker_cut_off_half_way_through_a_message_is_gone_and_the_others_finish():
    """Each worker has a pipe of its own: one killed while sending (its pipe ends inside a message)
    is recorded as gone, and the model process goes on serving the others to the end."""
    from nerbatch.rundir import Tally
    from nerbatch.serve import Worker, serve

    cut_reader, cut_writer = multiprocessing.Pipe(duplex=False)
    os.write(cut_writer.fileno(), struct.pack("!i", 1_000_000) + b"the first bytes of a batch")
    cut_writer.close()
    reader, writer = multiprocessing.Pipe(duplex=False)
    writer.send(("next",))
    writer.send(("settled", vars(Tally(rows=3)), None))
    writer.send(("finished", 500.0))
    writer.close()
    cut, whole = Worker(None, cut_reader, queue.Queue()), Worker(None, reader, queue.Queue())
    assert serve(None, [cut, whole], deque(["unit 0"]), bar=None) == 0
    assert cut.gone and not whole.gone and whole.tally.rows == 3 and whole.peak_rss_mb == 500.0
    assert whole.replies.get_nowait() == ("unit", "unit 0") and whole.unit == "unit 0"


class FailingModel:
    """An annotator stand-in whose model process cannot run a batch (out of memory)."""

    def run_batch(self, ids, mask):
        raise RuntimeError("CUDA out of memory")


def test_a_batch_the_model_process_cannot_run_is_an_error_reply_to_its_worker():
    """The model process turns the failure into that batch's reply (the worker's unit then fails
    alone, `RemoteBatch.result` above) and goes on serving."""
    from nerbatch.serve import Worker, reply, start_batch

    worker = Worker(None, None, queue.Queue())
    reply(worker, start_batch(FailingModel(), np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64)))
    assert worker.replies.get_nowait() == ("error", "RuntimeError: CUDA out of memory")


def test_a_worker_that_cannot_start_raises_its_own_error(tiny_model_dir, corpus, tmp_path, monkeypatch):
    """Spawning pickles the annotator: a failure there is the error the command shows (not one from
    cleaning up processes that never started)."""
    from nerbatch.annotate import annotate_units
    from nerbatch.options import Options

    options = Options(model=str(tiny_model_dir), inputs=[str(corpus)], output=str(tmp_path / "out"), workers=2)

    def unpicklable(self):
        raise TypeError("cannot pickle this annotator")

    monkeypatch.setattr(Annotator, "__getstate__", unpicklable)
    with pytest.raises(TypeError, match="cannot pickle this annotator"):
        annotate_units(options)


def test_a_worker_whose_model_process_is_gone_stops_without_failing_its_unit():
    """A closed pipe is a SystemExit, which `settle_unit` (it catches Exception) does not record as
    the unit's failure: the model process died, and its rerun redoes the unit."""
    worker_end, model_end = multiprocessing.Pipe()
    model_end.close()
    client = ServerClient(worker_end, queue.Queue())
    with pytest.raises(SystemExit) as stopped:
        client.submit(np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64))
    assert not isinstance(stopped.value, Exception) and stopped.value.code == GONE


PARENT_SCRIPT = """
import multiprocessing, sys, time
from nerbatch.serve import watch_parent

def blocked_for_ever(reader, writer):  # holds the write end too, as a worker holds its reply queue's
    watch_parent()
    reader.recv()

if __name__ == "__main__":
    reader, writer = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(target=blocked_for_ever, args=(reader, writer))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
@pytest.mark.parametrize("stderr_reader", ["alive", "killed too"])
def test_a_worker_blocked_in_a_read_exits_when_its_model_process_is_killed(tmp_path, stderr_reader):
    """SIGKILL of the model process half way through a reply left workers blocked in a read for
    ever (found by a chaos run): `watch_parent` ends them within a second or two, also when the
    reader of their stderr died with the parent (`... | tee log`: printing the reason fails)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    reader, writer = os.pipe()
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=writer, text=True)
    os.close(writer)
    child = int(parent.stdout.readline())
    time.sleep(1.5)
    assert running(child)  # the watcher leaves it alone while its parent lives
    if stderr_reader == "killed too":
        os.close(reader)
    parent.kill()
    parent.wait()
    assert all_gone([child], 15)
    if stderr_reader == "alive":
        with os.fdopen(reader) as stderr:
            assert GONE in stderr.read()
