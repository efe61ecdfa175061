"""`annotate --workers N`: this process only runs the model; N worker processes do the rest.

What an annotate process does besides the forward pass (reading, tokenizing, planning windows,
decoding spans, writing Parquet) runs under one GIL: on an H100 it kept one process at 36-41% of
the forward-only ceiling (README, GPU). Several processes sharing a GPU each hold a CUDA context,
and contexts take turns on the GPU. Here the rank's process keeps the one context and serves forward
passes; each worker annotates units exactly as `nerbatch.annotate.annotate_unit` does in process,
except that a padded batch goes to this process over a pipe and its probabilities come back. Each
worker batches one chunk at a time, as in process, so the output is the same.

Workers are spawned (a process that has initialised CUDA cannot fork) with a copy of the
`Annotator` without its model, and ask this process for units one at a time, so a worker that
finishes early takes the next one. Each worker has channels of its own: a pipe for its requests,
whose end of file says the worker is gone, and a queue for the replies, sent by a background thread
so that this process never waits for a worker to read. Nothing is shared between workers, so one
killed half way through a message (or holding a lock) cannot stall the others. A unit that raises
fails alone, as in process; a worker that dies takes only its current unit with it (recorded as
failed, the rank raises `UnitsFailed` at the end and a rerun redoes it), and the others go on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import numpy as np
import torch

from nerbatch import startup
from nerbatch.dist import exit_after
from nerbatch.inference import Annotator, LocalBatch
from nerbatch.modeling import ModelError
from nerbatch.options import Options
from nerbatch.rundir import RunDir, Tally
from nerbatch.shards import Unit
from nerbatch.storage import locate

# Batches launched on the GPU before the oldest one's probabilities are sent back: the GPU works
# through the queued ones while this process reads the next request and replies.
IN_FLIGHT = 3
WAIT_SECONDS = 0.001  # how long this process waits for a request while the GPU finishes the oldest batch


@dataclass
class Worker:
    """This process's view of one worker process."""

    process: multiprocessing.process.BaseProcess
    requests: Connection  # the read end of its requests pipe
    replies: multiprocessing.queues.Queue
    unit: Unit | None = None  # the unit it was last given
    tally: Tally = field(default_factory=Tally)  # of the units it settled, as each settles
    failed: list[tuple[Unit, str]] = field(default_factory=list)
    finished: bool = False  # it said it has no more work (then exits)
    peak_rss_mb: float | None = None
    gone: bool = False  # its pipe closed before it finished: killed, crashed


def annotate_with_workers(
    todo: list[Unit], annotator: Annotator, options: Options, out: RunDir, schema, rank: int, bar
) -> tuple[Tally, list[tuple[Unit, str]]]:
    """Annotate the units `todo` with `options.workers` worker processes while this process runs the
    model for them; returns the tally and the failed units, as `nerbatch.annotate.annotate_all`."""
    context = multiprocessing.get_context("spawn")
    workers, ends = [], []
    for index in range(min(options.workers, len(todo))):
        reader, writer = context.Pipe(duplex=False)
        replies = context.Queue()
        replies.cancel_join_thread()  # replies a dead worker never read must not hold up our exit
        args = (annotator, options, schema, rank, writer, replies)
        process = context.Process(target=work, args=args, name=f"nerbatch-worker-{index}", daemon=True)
        workers.append(Worker(process, reader, replies))
        ends.append(writer)
    began, cpu = time.perf_counter(), time.process_time()
    try:
        for worker, writer in zip(workers, ends):
            worker.process.start()
            writer.close()  # the worker holds the only write end: its exit is our end of file
        batches = serve(annotator, workers, deque(todo), bar)
    finally:
        for worker, writer in zip(workers, ends):
            writer.close()  # (those of workers that never started)
            if worker.process.pid is None:
                continue
            if worker.process.is_alive():  # after an error here (Ctrl-C, SIGTERM): they must not outlive us
                worker.process.terminate()
            worker.process.join()
            worker.requests.close()
            worker.replies.close()
    # how busy serving kept this process: near 1 CPU second a second, the workers wait for it
    wall = time.perf_counter() - began
    stats = {
        "workers": len(workers),
        "batches": batches,
        "wall_seconds": wall,
        "cpu_seconds": time.process_time() - cpu,
    }
    peaks = {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": [w.peak_rss_mb for w in workers]}
    (out.meta / "stats" / f"server-rank-{rank:05d}.json").write_json(stats | peaks)
    tally, failed = account(todo, workers, out)
    tally.seconds = wall  # the units ran side by side: their own durations add up to more
    return tally, failed


def serve(annotator: Annotator, workers: list[Worker], units: deque[Unit], bar) -> int:
    """Answer the workers' requests (batches to run, units to take, progress, their reports) until
    every worker has exited; returns how many batches ran."""
    launched: deque[tuple[Worker, LocalBatch | FailedBatch]] = deque()
    listening = {worker.requests: worker for worker in workers}
    batches = 0
    while listening:
        # with batches on the GPU, reply as soon as the oldest is back and nothing else is asked for
        oldest_back = bool(launched) and launched[0][1].ready()
        ready = wait(list(listening), timeout=None if not launched else 0 if oldest_back else WAIT_SECONDS)
        if not ready:
            if oldest_back:
                reply(*launched.popleft())
            continue
        for connection in ready:
            worker = listening[connection]
            try:
                message = connection.recv()
            except (EOFError, OSError):  # exited: after its last word, or killed (maybe half way through a message)
                del listening[connection]
                worker.gone = not worker.finished
                continue
            kind = message[0]
            if kind == "batch":
                batches += 1
                launched.append((worker, start_batch(annotator, *message[1:])))
                if len(launched) > IN_FLIGHT:
                    reply(*launched.popleft())
            elif kind == "next":  # it has every reply it asked for: this one can go at once
                worker.unit = units.popleft() if units else None
                worker.replies.put(("unit", worker.unit))
            elif kind == "progress":
                bar.advance(*message[1:])
            elif kind == "settled":  # a unit done (its tally) or failed (its unit and error)
                _, tally, failure = message
                if tally is not None:
                    worker.tally.add(Tally(**tally))
                else:
                    worker.failed.append(failure)
            elif kind == "finished":
                worker.finished, worker.peak_rss_mb = True, message[1]
    return batches


class FailedBatch:
    """A batch the model could not even start (e.g. out of GPU memory): its result is the error."""

    def __init__(self, error: Exception):
        self.error = error

    def ready(self) -> bool:
        return True

    def result(self) -> tuple[np.ndarray, bool]:
        raise self.error


def start_batch(annotator: Annotator, ids: np.ndarray, mask: np.ndarray) -> LocalBatch | FailedBatch:
    """Start one batch; a failure becomes its reply, and the worker's unit then fails alone."""
    try:
        return annotator.run_batch(torch.from_numpy(ids), torch.from_numpy(mask))
    except Exception as exc:
        return FailedBatch(exc)


def reply(worker: Worker, launched: LocalBatch | FailedBatch) -> None:
    """Send a batch's probabilities (or why there are none) to the worker that asked."""
    try:
        worker.replies.put(("probs", *launched.result()))
    except Exception as exc:
        worker.replies.put(("error", f"{type(exc).__name__}: {exc}"))


def account(todo: list[Unit], workers: list[Worker], out: RunDir) -> tuple[Tally, list[tuple[Unit, str]]]:
    """The workers' tallies and failures, plus the units that a dead worker left unfinished or that
    no worker took (every one of them died), recorded as failed so that a rerun redoes them."""
    from nerbatch.annotate import record_failure

    tally, failed = Tally(), []
    for worker in workers:
        tally.add(worker.tally)
        failed += worker.failed
    settled = {u.index for u, _ in failed}
    (out.meta / "done").refresh()  # markers the workers wrote: an object store's cached listing lacks them
    for unit in todo:
        if unit.index in settled or out.is_done(unit):
            continue
        died = [w for w in workers if w.gone and w.unit == unit]
        why = (
            f"{died[0].process.name} exited with code {died[0].process.exitcode} while annotating it"
            if died
            else "every worker exited before taking it"
        )
        failed.append(record_failure(out, unit, f"not annotated: {why}; rerun the same command"))
    return tally, failed


# A worker whose model process died stops with this line: its unit is neither done nor failed, and
# the rerun that the model process's own failure calls for redoes it.
GONE = "nerbatch worker: the annotate process serving the model is gone"


class ServerClient:
    """A worker's end of the model process: `Annotator.run_batch` sends batches here, and the
    worker asks it for units."""

    def __init__(self, requests: Connection, replies):
        self.requests, self.replies = requests, replies
        self.waiting: deque[RemoteBatch] = deque()  # sent, reply not read yet, in order

    def submit(self, ids: np.ndarray, mask: np.ndarray) -> RemoteBatch:
        self.send(("batch", ids, mask))
        batch = RemoteBatch(self)
        self.waiting.append(batch)
        return batch

    def next_unit(self) -> Unit | None:
        """The next unit to annotate (None: no more). First reads the replies of batches nobody
        waits for any more (their unit failed half way), so that the next reply is this one's."""
        while self.waiting:
            self.receive(self.waiting[-1])
        self.send(("next",))
        return self.read()[1]

    def advance(self, docs: int, tokens: int) -> None:
        """The progress bar's `advance`, forwarded (the model process owns the bar)."""
        self.send(("progress", docs, tokens))

    def settled(self, tally: Tally | None, failure: tuple[Unit, str] | None) -> None:
        """Say that a unit is done (its tally) or failed (the unit and its error), as it happens:
        what a worker did is known even if it dies later."""
        self.send(("settled", vars(tally) if tally else None, failure))

    def finish(self) -> None:
        """No more work: say so, with this process's peak memory."""
        self.send(("finished", peak_rss_mb()))

    def receive(self, batch: RemoteBatch) -> None:
        """Read replies until `batch` has its own; they come in the order the batches were sent."""
        while batch.reply is None:
            self.waiting.popleft().reply = self.read()

    def send(self, message: tuple) -> None:
        try:
            self.requests.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise SystemExit(GONE) from None  # not an Exception: the unit is not recorded as failed

    def read(self) -> tuple:
        # blocks without a timeout: if the model process dies, `watch_parent` ends this process
        return self.replies.get()


class RemoteBatch:
    """A batch sent to the model process (a worker's `Pending`)."""

    def __init__(self, client: ServerClient):
        self.client = client
        self.reply: tuple | None = None

    def result(self) -> tuple[np.ndarray, bool]:
        self.client.receive(self)
        if self.reply[0] == "error":
            raise ModelError(f"the model process could not run a batch: {self.reply[1]}")
        _, probs, rerun = self.reply
        return probs, rerun


def work(annotator: Annotator, options: Options, schema, rank: int, requests: Connection, replies) -> None:
    """A worker process: annotate the units the model process gives it, saying how each settled."""
    from nerbatch.annotate import settle_unit

    # Ctrl-C reaches every process of the terminal: the model process stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent()
    startup.begin()  # this process's collector as in the console command's (`nerbatch.startup`)
    startup.end()
    client = annotator.server = ServerClient(requests, replies)
    out = RunDir(locate(options.output))
    with startup.collections_per_chunk() as collect:
        while (unit := client.next_unit()) is not None:
            client.settled(*settle_unit(unit, annotator, options, out, schema, rank, client, collect))
    client.finish()


def watch_parent() -> threading.Thread | None:
    """End this process with `GONE` once the process that spawned it (the model process) is gone,
    whatever it is blocked in. A read can block for ever: the model process killed half way through
    a reply leaves part of a message in the queue's pipe, and this process's own copy of the pipe's
    write end means the read never sees end of file. None outside a multiprocessing child."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return None
    # `join` returns when the parent's end of its sentinel pipe closes: it has exited
    return exit_after(parent.join, GONE)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
