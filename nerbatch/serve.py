"""`annotate --workers N`: this process only runs the model; N worker processes do the rest.

What an annotate process does besides the forward pass (reading, tokenizing, planning windows,
decoding spans, writing Parquet) runs under one GIL: on a GPU it kept one process at about a third
of the forward-only ceiling (README, GPU). Several processes sharing a GPU each hold a CUDA context,
and contexts take turns on the GPU. Here the rank's process keeps the one context and serves forward
passes; each worker annotates units exactly as `nerbatch.annotate.annotate_unit` does in process,
except that a padded batch goes to this process over a queue and its probabilities come back. Each
worker batches one chunk at a time, as in process, so the output is the same.

Workers are spawned (a process that has initialised CUDA cannot fork) with a copy of the
`Annotator` without its model. They take units from a shared queue, so a worker that finishes
early takes the next one. A unit that raises fails alone, as in process; a worker that dies takes
only its current unit with it (recorded as failed, the rank raises `UnitsFailed` at the end and a
rerun redoes it), and the others go on.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from nerbatch import startup
from nerbatch.inference import Annotator, Pending
from nerbatch.modeling import ModelError
from nerbatch.options import Options
from nerbatch.rundir import RunDir, Tally
from nerbatch.shards import Unit
from nerbatch.storage import locate

# Batches launched on the GPU before the oldest one's probabilities are sent back: the GPU works
# through the queued ones while this process reads the next request and replies.
IN_FLIGHT = 3
POLL_SECONDS = 1.0  # how often an idle server looks for dead workers, and a waiting worker for its server


@dataclass
class Worker:
    """The server's view of one worker process."""

    process: multiprocessing.process.BaseProcess
    replies: multiprocessing.queues.Queue
    unit: Unit | None = None  # the unit it is annotating
    report: tuple[dict, list] | None = None  # its tally and failures, once it has finished
    gone: bool = False  # exited without a report (killed, crashed)

    @property
    def settled(self) -> bool:
        return self.report is not None or self.gone


def annotate_with_workers(
    todo: list[Unit], annotator: Annotator, options: Options, out: RunDir, schema, rank: int, bar
) -> tuple[Tally, list[tuple[Unit, str]]]:
    """Annotate the units `todo` with `options.workers` worker processes while this process runs the
    model for them; returns the tally and the failed units, as `nerbatch.annotate.annotate_all`."""
    context = multiprocessing.get_context("spawn")
    requests, units = context.Queue(), context.Queue()
    # what is still unsent to a dead worker must not hold up this process's exit
    units.cancel_join_thread()
    for unit in todo:
        units.put(unit)
    workers = []
    for index in range(min(options.workers, len(todo))):
        units.put(None)  # one end-of-work mark per worker
        replies = context.Queue()
        replies.cancel_join_thread()
        args = (index, annotator, options, schema, rank, units, requests, replies)
        process = context.Process(target=work, args=args, name=f"nerbatch-worker-{index}", daemon=True)
        workers.append(Worker(process, replies))
    began, cpu = time.perf_counter(), time.process_time()
    try:
        for worker in workers:
            worker.process.start()
        batches = serve(annotator, requests, workers, bar)
    finally:
        for worker in workers:  # after an error here (Ctrl-C, SIGTERM): the workers must not outlive us
            if worker.process.is_alive():
                worker.process.terminate()
            worker.process.join()
    # how busy serving kept this process: near 1 CPU second a second, the workers wait for it
    wall = time.perf_counter() - began
    stats = {"workers": len(workers), "batches": batches, "wall_seconds": wall}
    (out.meta / "stats" / f"server-rank-{rank:05d}.json").write_json(
        {**stats, "cpu_seconds": time.process_time() - cpu}
    )
    tally, failed = account(todo, workers, out)
    tally.seconds = wall  # the units ran side by side: their own durations add up to more
    return tally, failed


def serve(annotator: Annotator, requests, workers: list[Worker], bar) -> int:
    """Run the workers' batches on the model until every worker has finished or died; returns how
    many batches ran."""
    launched: deque[tuple[Worker, Pending | None, str | None]] = deque()
    batches = 0
    while not all(w.settled for w in workers):
        # seen before reading: whatever a worker sent before it exited is in the queue by then
        exited = [w for w in workers if w.process.exitcode is not None]
        try:
            # with batches on the GPU, reply as soon as nothing else is asked for
            message = requests.get(timeout=0 if launched else POLL_SECONDS)
        except queue.Empty:
            if launched:
                reply(*launched.popleft())
            for worker in exited:
                worker.gone = worker.report is None
            continue
        kind, worker = message[0], workers[message[1]]
        if kind == "batch":
            batches += 1
            launched.append(launch(annotator, worker, *message[2:]))
            if len(launched) > IN_FLIGHT:
                reply(*launched.popleft())
        elif kind == "unit":
            worker.unit = message[2]
        elif kind == "progress":
            bar.advance(*message[2:])
        elif kind == "done":
            worker.report = message[2:]
    return batches


def launch(annotator: Annotator, worker: Worker, ids: np.ndarray, mask: np.ndarray):
    """Start one batch; a failure goes back to the worker, whose unit then fails alone."""
    try:
        return worker, annotator.run_batch(torch.from_numpy(ids), torch.from_numpy(mask)), None
    except Exception as exc:  # e.g. out of GPU memory
        return worker, None, f"{type(exc).__name__}: {exc}"


def reply(worker: Worker, pending: Pending | None, error: str | None) -> None:
    """Send a batch's probabilities (or why there are none) to the worker that asked."""
    if pending is not None:
        try:
            worker.replies.put((*pending.result(), None))
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    worker.replies.put((None, False, error))


def account(todo: list[Unit], workers: list[Worker], out: RunDir) -> tuple[Tally, list[tuple[Unit, str]]]:
    """The workers' tallies and failures, plus the units that a dead worker left unfinished or that
    no worker took (every one of them died), recorded as failed so that a rerun redoes them."""
    tally, failed = Tally(), []
    for worker in workers:
        if worker.report:
            tally.add(Tally(**worker.report[0]))
            failed += worker.report[1]
    settled = {u.index for u, _ in failed}
    for unit in todo:
        if unit.index in settled or out.is_done(unit):
            continue
        died = [w for w in workers if w.gone and w.unit == unit]
        why = (
            f"{died[0].process.name} exited with code {died[0].process.exitcode} while annotating it"
            if died
            else "every worker exited before taking it"
        )
        message = f"{unit.describe()}: not annotated: {why}; rerun the same command"
        out.mark_failed(unit, message)
        failed.append((unit, message))
        print(f"nerbatch annotate: unit {unit.name} failed: {message}", file=sys.stderr)
    return tally, failed


class ServerClient:
    """A worker's end of the model server: `Annotator.run_batch` sends batches here."""

    def __init__(self, index: int, requests, replies):
        self.index, self.requests, self.replies = index, requests, replies
        self.waiting: deque[RemoteBatch] = deque()
        self.parent = os.getppid()

    def submit(self, ids: np.ndarray, mask: np.ndarray) -> RemoteBatch:
        self.requests.put(("batch", self.index, ids, mask))
        batch = RemoteBatch(self)
        self.waiting.append(batch)
        return batch

    def receive(self, batch: RemoteBatch) -> None:
        """Read replies until `batch` has its own. Replies come in the order the batches were sent;
        those of batches nobody waits for any more (their unit failed) are read and dropped."""
        while batch.reply is None:
            try:
                self.waiting[0].reply = self.replies.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if os.getppid() != self.parent:
                    self.requests.cancel_join_thread()  # nobody reads them any more
                    raise SystemExit("nerbatch worker: the annotate process serving the model is gone") from None
                continue
            self.waiting.popleft()


class RemoteBatch:
    """A batch sent to the model server (the `Pending` of a worker)."""

    def __init__(self, client: ServerClient):
        self.client = client
        self.reply: tuple | None = None

    def result(self) -> tuple[np.ndarray, bool]:
        self.client.receive(self)
        probs, rerun, error = self.reply
        if error is not None:
            raise ModelError(f"the model process could not run a batch: {error}")
        return probs, rerun


class ProgressMessages:
    """The progress bar's `advance`, forwarded to the server (which owns the bar)."""

    def __init__(self, index: int, requests):
        self.index, self.requests = index, requests

    def advance(self, docs: int, tokens: int) -> None:
        self.requests.put(("progress", self.index, docs, tokens))


def work(index: int, annotator: Annotator, options: Options, schema, rank: int, units, requests, replies) -> None:
    """A worker process: annotate units from `units` until its end mark, then report."""
    from nerbatch.annotate import annotate_unit, record_failure

    startup.begin()  # this process's collector as in the console command's (`nerbatch.startup`)
    startup.end()
    annotator.server = ServerClient(index, requests, replies)
    out = RunDir(locate(options.output))
    progress = ProgressMessages(index, requests)
    tally, failed = Tally(), []
    with startup.collections_per_chunk() as collect:
        while (unit := units.get()) is not None:
            requests.put(("unit", index, unit))
            try:
                tally.add(annotate_unit(unit, annotator, options, out, schema, rank, progress, collect))
            except Exception as exc:  # one corrupt file must not stop the other units
                failed.append(record_failure(out, unit, exc))
    requests.put(("done", index, vars(tally), failed))
