"""The annotate job: Parquet documents in, one row of word-level entity spans per document out.

Each process takes its share of the units (`nerbatch.shards`), and for each unit streams record
batches, tokenizes them in a background thread (`nerbatch.prefetch`, `nerbatch.rows`) while the
model runs on the previous chunk, writes a zstd part file under a temporary name, publishes it
atomically and records completion (`nerbatch.rundir`). A rerun of the same command skips completed
units and redoes the rest.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nerbatch.errors import NerbatchError
from nerbatch.inference import Annotator
from nerbatch.options import Options
from nerbatch.parquet_io import SOURCE_FIELDS, PartWriter, open_parquet, output_schema, write_json_atomic
from nerbatch.prefetch import prefetch
from nerbatch.rows import output_columns, read_chunks
from nerbatch.rundir import RunDir, Tally, output_metadata, run_config, wait_for_other_ranks, write_totals_if_complete
from nerbatch.shards import Unit, discover_inputs, plan_units, units_for_rank

# Test hook (documented in tests/test_annotate_launch.py): sleep this many seconds after writing each
# record batch, so a test can SIGKILL the job while a part is half written.
SLOW_ENV = "NERBATCH_TEST_SLOW_BATCH_S"


class UnitsFailed(NerbatchError):
    """Some units raised; their files are named and the other units' parts are complete."""

    def __init__(self, failed: list[tuple[Unit, str]]):
        lines = "\n".join(f"  {unit.name}: {message}" for unit, message in failed)
        super().__init__(
            f"{len(failed)} unit(s) failed (their outputs were not written; fix the input and rerun "
            f"the same command to finish them):\n{lines}"
        )


def annotate_units(
    options: Options,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    device: str | None = None,
) -> Tally:
    """Annotate this rank's units of the run `options` describes, skipping those already done.

    Raises `InputError`/`ModelError` before any work on bad input or a model that cannot annotate,
    and `UnitsFailed` at the end when some units raised (the others are complete).
    """
    started = time.time()
    annotator = load_annotator(options, device)  # a model that cannot annotate fails here, before any work
    units = plan_units(discover_inputs(options.inputs, exclude=options.output), options.columns)
    config = run_config(options, units, annotator)
    out = RunDir(options.output)
    if rank == 0:
        out.prepare(config, options.overwrite)
    barrier()  # nobody writes parts before the main process has checked (or cleared) OUT_DIR
    if rank != 0:
        out.check(config)

    mine = [u for u in units_for_rank(units, rank, world) if not out.is_done(u)]
    tally = Tally()
    failed: list[tuple[Unit, str]] = []
    if mine:
        schema = output_schema(_id_fields(units, options.id_column), output_metadata(config))
        bar = Progress(sum(u.rows for u in mine), options.progress and rank == 0)
        for unit in mine:
            try:
                tally.add(annotate_unit(unit, annotator, options, out, schema, rank, bar))
            except Exception as exc:  # one corrupt file must not stop the other units
                message = f"{unit.describe()}: {type(exc).__name__}: {exc}"
                out.mark_failed(unit, message)
                failed.append((unit, message))
                print(f"nerbatch annotate: unit {unit.name} failed: {message}", file=sys.stderr)
        bar.close()
    write_json_atomic(
        out.meta / "stats" / f"rank-{rank:05d}-of-{world:05d}.json",
        {**vars(tally), "units": len(mine), "failed": [m for _, m in failed], "wall_seconds": time.time() - started},
    )
    if failed:
        wait_for_other_ranks(out, units, set(units_for_rank(units, rank, world)), started)
        raise UnitsFailed(failed)
    write_totals_if_complete(out, units, config)
    return tally


def annotate_unit(
    unit: Unit, annotator: Annotator, options: Options, out: RunDir, schema, rank: int, bar: Progress
) -> Tally:
    """Annotate one unit into its part file, publish it and record completion."""
    began = time.perf_counter()
    tally = Tally()
    writer = PartWriter(out.part(unit), out.temporary(unit, rank), schema)
    slow = float(os.environ.get(SLOW_ENV, "0"))
    chunks = read_chunks(unit, annotator, options.text_column, options.id_column, options.read_rows)
    try:
        for chunk in prefetch(chunks):
            annotator.forward(chunk.documents())
            writer.write(output_columns(chunk, annotator, tally))
            bar.advance(len(chunk.texts), sum(d.n_tokens for d in chunk.documents()))
            if slow:
                time.sleep(slow)
    except BaseException:
        writer.abandon()
        raise
    writer.publish()
    tally.seconds = time.perf_counter() - began
    out.mark_done(unit, vars(tally))
    return tally


def load_annotator(options: Options, device: str | None = None) -> Annotator:
    """The checked model and tokenizer of `options.model` with the windowing/batching options."""
    from nerbatch.modeling import load_token_classifier

    model, tokenizer = load_token_classifier(options.model)
    if device:
        model.to(device)
    return Annotator(
        model,
        tokenizer,
        options.aggregation,
        options.max_length,
        options.stride,
        options.batch_size,
        options.max_batch_tokens,
        options.segment,
        options.precision,
    )


def _id_fields(units: list[Unit], id_column: str | None):
    if not id_column:
        return SOURCE_FIELDS
    return [open_parquet(Path(units[0].path)).schema_arrow.field(id_column)] if units else []


class Progress:
    """A tqdm bar in docs/s with the running tokens/s as its postfix."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="doc", disable=not enabled, mininterval=1.0, file=sys.stderr)
        self.tokens = 0
        self.began = time.perf_counter()

    def advance(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.began, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(docs)

    def close(self) -> None:
        self.bar.close()
