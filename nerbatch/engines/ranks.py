"""The annotate job in one process, or in the ranks `accelerate launch` / torchrun started.

Each rank loads the model, takes the fixed share `units[rank::world]` of the units not done, and
settles them in turn (`nerbatch.job`). The ranks coordinate through OUT_DIR alone, plus barriers before any work:
rank 0 checks (or claims) OUT_DIR before anyone writes, every rank proves it sees the OUT_DIR rank 0
sees and runs its versions (`nerbatch.engines.probe`), every rank says it is working now and then
(`RunDir.beat`), and a rank done with its share waits until every other rank's units have settled
(an output file may hold units of every rank) before assembling the files `k` with `k % world ==
rank`. Completion is per unit, so a rerun may use any number of ranks, or another engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nerbatch import gc_tuning
from nerbatch.autoprecision import Choice, agreed_flags
from nerbatch.cpu import cpu_flags
from nerbatch.engines import probe
from nerbatch.errors import NerbatchError, OptionError
from nerbatch.inference import Tagger
from nerbatch.job import (
    Plan,
    Progress,
    UnitsFailed,
    assemble_if_ready,
    choose_run_precision,
    describe_run,
    finish_run,
    load_tagger,
    plan_run,
    say_choice,
)
from nerbatch.job import settle_unit as settle
from nerbatch.options import Options
from nerbatch.parquet_io import InputError
from nerbatch.rundir import RunDir, Tally, peak_rss_mb
from nerbatch.shards import Unit, units_for_rank, warn_about_units

PROBE = "ranks"  # the probe's token: a fixed name, cleared by rank 0 before it leaves its own
STALL_S = 1800.0  # a rank gives up waiting for the others after this long without a sign of work


def annotate_units(
    options: Options,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    device: str | None = None,
    gather: Callable[[object], list] = lambda value: [value],
) -> Tally:
    """Annotate this rank's units of the run `options` describes, skipping those already done.

    Raises `InputError`/`ModelError` before any work on bad input or a model that cannot annotate,
    and `UnitsFailed` at the end when some units raised (the others are complete).
    """
    started = time.time()
    plan = plan_run(options)
    if rank == 0:
        warn_about_units(plan.units)
    else:
        plan = probe.node_view(plan)
    choice = agree_on_precision(plan, rank, device, gather)
    tagger = load_tagger(options, device, choice)  # a model that cannot annotate fails here, before any work
    if rank == 0:
        say_choice(choice)
    config, schema = describe_run(plan, tagger)
    out = plan.out
    if rank == 0:
        out.prepare(config, options.overwrite)
    if world > 1:
        probe_ranks(out, rank, world, barrier, gather)
    barrier()  # nobody writes pieces before the main process has checked (or cleared) OUT_DIR
    if rank != 0:
        out.check(config)

    mine = set(units_for_rank(plan.units, rank, world))
    todo = plan.todo([u for u in plan.units if u in mine])
    work_started_at = time.time()  # the first document: start-up is the time before it
    try:
        tally, failed = annotate_all(todo, tagger, plan, schema, rank) if todo else (Tally(), [])
    finally:
        tagger.close()  # the model's work is done (or stopped): its CPU lanes drop what is queued
    figures = {**vars(tally), "units": len(todo), "failed": [m for _, m in failed], "work_started_at": work_started_at}
    figures = {**figures, "wall_seconds": time.time() - started, "peak_rss_mb": peak_rss_mb()}
    out.write_worker_stats("rank", rank, world, figures)
    everyone_settled = wait_for_other_ranks(out, plan.units, mine, started)  # a file may hold units of every rank
    for index, (name, group) in enumerate(zip(plan.file_names(), plan.groups)):
        if index % world == rank:
            assemble_if_ready(out, name, group, schema, options)
    if failed:
        raise UnitsFailed(failed)
    if not everyone_settled:
        raise NerbatchError(
            f"rank {rank}: the other ranks finished no unit and sent no sign of work for 30 minutes, so the "
            "output files holding their units were not assembled; rerun the same command to finish the run"
        )
    finish_run(plan, config)
    return tally


def agree_on_precision(plan: Plan, rank: int, device: str | None, gather: Callable[[object], list]) -> Choice:
    """One precision for every rank, before any work: rank 0 resolves it from the CPU flags all ranks
    share (ranks on different CPU types get what every one of them runs natively) and every rank takes
    rank 0's choice, or its error."""
    flags = gather(sorted(cpu_flags()))
    choice = error = None
    if rank == 0:
        try:
            device_type = "cuda" if device and device.startswith("cuda") else "cpu"
            choice = choose_run_precision(plan, device_type, agreed_flags(flags))
        except NerbatchError as exc:
            error = str(exc)
        except Exception as exc:  # anything else too: the other ranks wait in the gather below
            error = f"choosing the precision failed: {type(exc).__name__}: {exc}"
    choice, error = gather((choice, error))[0]
    if error:
        raise OptionError(error)
    return choice


def probe_ranks(
    out: RunDir, rank: int, world: int, barrier: Callable[[], None], gather: Callable[[object], list]
) -> None:
    """Before any work: every rank must see the token rank 0 left in OUT_DIR, and rank 0 every
    rank's, with the same versions (`nerbatch.engines.probe`). Rank 0 judges from what every rank
    says (`gather`: every rank's object, to every rank) and its verdict goes to every rank, so all
    of them stop with the same message: none is left waiting for a rank on another node that quit."""
    if rank == 0:
        out.drop_probe(PROBE)  # a token an earlier run left here must not stand in for this run's
        probe.leave_token(out, PROBE, probe.MAIN)
    barrier()
    facts = probe.node_facts() if rank == 0 else probe.answer(out, PROBE, f"rank-{rank}")
    answers = gather(facts)
    verdict = None
    if rank == 0:
        try:
            workers = {f"rank {r}": answers[r] for r in range(1, world)}
            probe.check_workers(
                out, PROBE, workers, "rank 0", tokens={w: f"rank-{r}" for r, w in enumerate(workers, 1)}
            )
        except NerbatchError as exc:
            verdict = str(exc)
        finally:
            out.drop_probe(PROBE)
    verdict = gather(verdict)[0]
    if verdict:
        raise InputError(verdict)


def annotate_all(
    todo: list[Unit], tagger: Tagger, plan: Plan, schema, rank: int
) -> tuple[Tally, list[tuple[Unit, str]]]:
    """Annotate the units `todo` in turn; returns the tally and the units that raised, with their
    errors (the others are complete)."""
    bar = Progress(sum(u.rows for u in todo), plan.options.progress and rank == 0)

    def on_chunk(docs: int, tokens: int) -> None:
        plan.out.beat(rank)
        bar.advance(docs, tokens)

    try:
        tally, failed = Tally(), []
        with gc_tuning.collections_per_chunk():
            for unit in todo:
                done, failure = settle(unit, tagger, plan, schema, rank, on_chunk)
                if done:
                    tally.add(done)
                else:
                    failed.append(failure)
        return tally, failed
    finally:
        bar.close()


def wait_for_other_ranks(
    out: RunDir, units: list[Unit], mine: set, since: float, poll: float = 2.0, stall: float = STALL_S
) -> bool:
    """Wait until every other rank's units have settled (done, or failed in this run): an output
    file may hold units of every rank, and a failing rank must not exit (the launcher would kill
    the others' work in progress). Returns False when it gives up: no unit settled and no rank said
    it was working (`RunDir.beat`) for `stall` seconds, as when a rank died without a trace."""
    others = {u.name for u in units if u not in mine}
    count, changed = -1, time.time()
    while len(settled := out.settled(since) & others) < len(others):
        if len(settled) != count:
            count, changed = len(settled), time.time()
        elif time.time() - max(changed, out.last_beat()) > stall:
            return False
        time.sleep(poll)
    return True
