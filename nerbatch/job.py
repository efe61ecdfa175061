"""The annotate job: Parquet documents in, one row of word-level entity spans per document out.

Each process takes its share of the units (`nerbatch.shards`), and for each unit streams record
batches, tokenizes them in a background thread (`nerbatch.prefetch`, `nerbatch.rows`) while the
model runs on the previous chunk, writes the unit's rows as a piece under a temporary name,
publishes it atomically and records completion (`nerbatch.rundir`). When every unit has settled,
the output files are assembled from the pieces, each by one rank (`nerbatch.assemble`). A rerun of
the same command skips completed units and files and redoes the rest.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from nerbatch import gc_tuning
from nerbatch.assemble import assemble_file, check_partition_values, file_name
from nerbatch.errors import NerbatchError, OptionError
from nerbatch.inference import InFlight, Tagger
from nerbatch.options import Options
from nerbatch.parquet_io import SOURCE_FIELDS, PartWriter, open_parquet, output_schema
from nerbatch.prefetch import prefetch
from nerbatch.rows import Chunk, output_columns, read_chunks
from nerbatch.runconfig import output_metadata, run_config
from nerbatch.rundir import RunDir, Tally, wait_for_other_ranks, write_totals_if_complete
from nerbatch.shards import Unit, discover_inputs, group_units, plan_units, units_for_rank
from nerbatch.storage import check_access, locate

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
    check_options(options)
    tagger = load_tagger(options, device)  # a model that cannot annotate fails here, before any work
    out = RunDir(locate(options.output))
    check_access(out.root, str(options.output))
    files = discover_inputs(options.inputs, exclude=out.root)
    units = plan_units(files, options.columns, same_type=options.carried)
    if options.partition_by:
        check_partition_values(files, options.partition_by)
    groups = group_units(units, options.file_rows)
    config = run_config(options, units, tagger)
    if rank == 0:
        out.prepare(config, options.overwrite)
    barrier()  # nobody writes pieces before the main process has checked (or cleared) OUT_DIR
    if rank != 0:
        out.check(config)

    mine = set(units_for_rank(units, rank, world))
    todo = [u for u in units if u in mine and not out.is_done(u)]
    schema = output_schema(carried_fields(units, options), output_metadata(config))
    tally, failed = annotate_all(todo, tagger, options, out, schema, rank) if todo else (Tally(), [])
    out.write_rank_stats(
        rank,
        world,
        {**vars(tally), "units": len(todo), "failed": [m for _, m in failed], "wall_seconds": time.time() - started},
    )
    everyone_settled = wait_for_other_ranks(out, units, mine, started)  # a file may hold units of every rank
    for index, group in enumerate(groups):
        if index % world == rank:
            assemble_if_ready(out, file_name(index), group, schema, options)
    if failed:
        raise UnitsFailed(failed)
    if not everyone_settled:
        raise NerbatchError(
            f"rank {rank}: the other ranks finished no unit and sent no sign of work for 30 minutes, so the "
            "output files holding their units were not assembled; rerun the same command to finish the run"
        )
    write_totals_if_complete(out, units, [file_name(k) for k in range(len(groups))], config)
    return tally


def annotate_all(
    todo: list[Unit], tagger: Tagger, options: Options, out: RunDir, schema, rank: int
) -> tuple[Tally, list[tuple[Unit, str]]]:
    """Annotate the units `todo` in turn; returns the tally and the units that raised, with their
    errors (the others are complete)."""
    bar = Progress(sum(u.rows for u in todo), options.progress and rank == 0)
    try:
        tally, failed = Tally(), []
        with gc_tuning.collections_per_chunk():
            for unit in todo:
                done, failure = settle_unit(unit, tagger, options, out, schema, rank, bar)
                if done:
                    tally.add(done)
                else:
                    failed.append(failure)
        return tally, failed
    finally:
        bar.close()


def settle_unit(
    unit: Unit, tagger: Tagger, options: Options, out: RunDir, schema, rank: int, bar
) -> tuple[Tally | None, tuple[Unit, str] | None]:
    """`annotate_unit`'s tally, or (when it raised) None and the recorded failure: one corrupt file
    must not stop the other units."""
    try:
        return annotate_unit(unit, tagger, options, out, schema, rank, bar), None
    except Exception as exc:
        return None, record_failure(out, unit, f"{type(exc).__name__}: {exc}")


def record_failure(out: RunDir, unit: Unit, error: str) -> tuple[Unit, str]:
    """Record that `unit` failed with `error` (a rerun redoes it) and say so on stderr."""
    message = f"{unit.describe()}: {error}"
    out.mark_failed(unit, message)
    print(f"nerbatch annotate: unit {unit.name} failed: {message}", file=sys.stderr)
    return unit, message


def check_options(options: Options) -> None:
    """Option combinations that cannot work: one-line errors before anything is loaded."""
    taken = {"entities", "error", "n_windows"} | ({"source_file", "row_index"} if not options.id_column else set())
    for column in options.carried:
        if column in taken:
            raise OptionError(
                f"--keep-columns/--partition-by/--id-column {column!r}: the output has its own {column!r}"
            )
    if options.partition_by and options.partition_by in [options.id_column, *options.keep_columns]:
        raise OptionError(
            f"--partition-by {options.partition_by}: the partition value lives in the directory name "
            "(readers add it back as a column), so it cannot also be the id or a kept column"
        )
    if options.partition_by == options.text_column or options.text_column in options.keep_columns:
        raise OptionError(f"--keep-columns/--partition-by: {options.text_column!r} is the text column")
    for name, value in (("--row-group-rows", options.row_group_rows), ("--file-rows", options.file_rows)):
        if value < 1:
            raise OptionError(f"{name} must be at least 1 (got {value})")


def assemble_if_ready(out: RunDir, name: str, group: list[Unit], schema, options: Options) -> None:
    """Assemble output file `name` from its units' pieces once all are done (and it is not yet)."""
    if out.is_assembled(name):
        out.drop_pieces(group)  # left behind by a crash between recording the file and dropping them
        return
    if not all(out.is_done(u) for u in group):
        return
    try:
        published = assemble_file(
            name,
            [out.piece(u) for u in group],
            out.root,
            out.assembling(name),
            schema,
            options.partition_by,
            options.row_group_rows,
        )
    except Exception as exc:  # a piece deleted by hand, a full disk: say which file, keep the pieces
        raise NerbatchError(
            f"{out.root}: assembling {name} failed ({type(exc).__name__}: {exc}); its pieces are kept, "
            "rerun the same command to try again"
        ) from exc
    out.mark_assembled(name, group, published)


def annotate_unit(
    unit: Unit,
    tagger: Tagger,
    options: Options,
    out: RunDir,
    schema,
    rank: int,
    bar: Progress,
) -> Tally:
    """Annotate one unit into its piece, publish it and record completion."""
    began = time.perf_counter()
    tally = Tally()
    writer = PartWriter(out.piece(unit), out.temporary(unit), schema)
    slow = float(os.environ.get(SLOW_ENV, "0"))
    chunks = read_chunks(
        unit, tagger, options.text_column, options.carried, options.read_rows, has_id=bool(options.id_column)
    )

    def finish(chunk: Chunk, flight: InFlight) -> None:
        tally.fp32_batches += tagger.collect(flight)
        writer.write(output_columns(chunk, tagger, tally))
        out.beat(rank)
        bar.advance(len(chunk.texts), sum(d.n_tokens for d in chunk.documents()))
        gc_tuning.after_chunk()
        if slow:
            time.sleep(slow)

    try:
        previous = None
        for chunk in prefetch(chunks):
            # the model starts on this chunk before the previous one is decoded and written (on a GPU
            # they overlap; on a CPU it only changes the order of the work)
            launched = (chunk, tagger.launch(chunk.documents()))
            if previous:
                finish(*previous)
            previous = launched
        if previous:
            finish(*previous)
    except BaseException:
        writer.abandon()
        raise
    writer.publish()
    tally.seconds = time.perf_counter() - began
    out.mark_done(unit, vars(tally), rank)
    return tally


def load_tagger(options: Options, device: str | None = None) -> Tagger:
    """The checked model and tokenizer of `options.model` with the windowing/batching options."""
    from nerbatch.modeling import load_token_classifier
    from nerbatch.precision import quantize_int8, resolve_precision

    model, tokenizer = load_token_classifier(options.model)
    if device:
        model.to(device)
    if resolve_precision(options.precision, next(model.parameters()).device) == "int8":
        model = quantize_int8(model, tokenizer, inplace=True)  # the model is ours alone: no copy
    return Tagger(
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


def carried_fields(units: list[Unit], options: Options) -> list:
    """The output's leading fields: the carried input columns with their input types (one type in
    every file, checked in planning), or source_file and row_index without an id column."""
    fields = [] if options.id_column else list(SOURCE_FIELDS)
    if units and options.carried:
        schema = open_parquet(units[0].location).schema_arrow
        # nullable: the first file's schema may say "no nulls" where a later file has some
        fields += [schema.field(name).with_nullable(True) for name in options.carried]
    return fields


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
