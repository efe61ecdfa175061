"""The annotate job's core: what a run is, whoever runs it.

A run is planned from its options alone (`plan_run`: units fixed by the inputs, the output files
they form); the model, loaded where it runs (`load_tagger`), fixes the rest of the run config
(`describe_run`). Then each unit is settled once (`settle_unit`): its record batches are streamed
and tokenized in a background thread (`nerbatch.prefetch`, `nerbatch.rows`) while the model runs on
the previous chunk, its rows are written as a piece under a temporary name of its own attempt,
published in one move, and its done marker written (`nerbatch.rundir`); a unit that raises is
recorded failed and the others go on. Once every unit of an output file is done, the file is
assembled from the pieces (`assemble_if_ready`), and once all are, the run totals are written.

Nothing here knows who runs the units: one process or torchrun ranks (`nerbatch.engines.ranks`),
or actors of a Ray cluster (`nerbatch.engines.ray_actors`). A rerun with either skips what is done.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nerbatch import gc_tuning
from nerbatch.assemble import assemble_file, check_partition_values, file_name
from nerbatch.errors import NerbatchError, OptionError
from nerbatch.options import Options
from nerbatch.parquet_io import SOURCE_FIELDS, PartWriter, open_parquet, output_schema
from nerbatch.prefetch import prefetch
from nerbatch.runconfig import output_metadata, run_config
from nerbatch.rundir import RunDir, Tally, write_totals_if_complete
from nerbatch.shards import Unit, discover_inputs, group_units, plan_units
from nerbatch.storage import check_access, locate

if TYPE_CHECKING:  # the model's modules (torch, transformers) load only where a model runs, not on a driver
    from nerbatch.autoprecision import Choice
    from nerbatch.inference import InFlight, Tagger
    from nerbatch.rows import Chunk

# Test hooks (never set in production): sleep this many seconds after writing each chunk, so a test
# can SIGKILL the job while a piece is half written; the same for one worker only ("INDEX:SECONDS",
# a straggler); and exit in the middle of a unit ("UNIT_NAME[:ATTEMPTS]", a worker that dies).
SLOW_ENV = "NERBATCH_TEST_SLOW_BATCH_S"
SLOW_WORKER_ENV = "NERBATCH_TEST_SLOW_WORKER"
EXIT_ENV = "NERBATCH_TEST_EXIT_IN_UNIT"


class UnitsFailed(NerbatchError):
    """Some units raised; their files are named and the other units' parts are complete."""

    def __init__(self, failed: list[tuple[Unit, str]]):
        lines = "\n".join(f"  {unit.name}: {message}" for unit, message in failed)
        super().__init__(
            f"{len(failed)} unit(s) failed (their outputs were not written; fix the input and rerun "
            f"the same command to finish them):\n{lines}"
        )


@dataclass
class Plan:
    """A run as its options and inputs define it, before any model is loaded."""

    options: Options
    out: RunDir
    units: list[Unit]
    groups: list[list[Unit]]  # the units of each output file, in file order

    def file_names(self) -> list[str]:
        return [file_name(index) for index in range(len(self.groups))]

    def todo(self, units: list[Unit] | None = None) -> list[Unit]:
        """The units (of `units`, default all) not done yet."""
        return [u for u in (self.units if units is None else units) if not self.out.is_done(u)]


def plan_run(options: Options) -> Plan:
    """Check the options and OUT_DIR's reach, find the inputs and cut them into units and files;
    one-line errors before any work."""
    check_options(options)
    out = RunDir(locate(options.output))
    check_access(out.root, str(options.output))
    files = discover_inputs(options.inputs, exclude=out.root)
    units = plan_units(files, options.columns, same_type=options.carried)
    if options.partition_by:
        check_partition_values(files, options.partition_by)
    return Plan(options, out, units, group_units(units, options.file_rows))


def describe_run(plan: Plan, tagger: Tagger) -> tuple[dict, object]:
    """The run config (what the output depends on; a rerun must match it) and the output schema."""
    config = run_config(plan.options, plan.units, tagger)
    return config, output_schema(carried_fields(plan.units, plan.options), output_metadata(config))


def finish_run(plan: Plan, config: dict) -> None:
    """Write the run totals if every unit is done and every output file assembled."""
    write_totals_if_complete(plan.out, plan.units, plan.file_names(), config)


def settle_unit(
    unit: Unit,
    tagger: Tagger,
    plan: Plan,
    schema,
    worker: int = 0,
    on_chunk: Callable[[int, int], None] = lambda docs, tokens: None,
    attempt: int = 1,
) -> tuple[Tally | None, tuple[Unit, str] | None]:
    """`annotate_unit`'s tally, or (when it raised) None and the recorded failure: one corrupt file
    must not stop the other units."""
    try:
        return annotate_unit(unit, tagger, plan, schema, worker, on_chunk, attempt), None
    except Exception as exc:
        return None, record_failure(plan.out, unit, f"{type(exc).__name__}: {exc}")


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
    plan: Plan,
    schema,
    worker: int = 0,
    on_chunk: Callable[[int, int], None] = lambda docs, tokens: None,
    attempt: int = 1,
) -> Tally:
    """Annotate one unit into its piece, publish it and record completion. `worker` names who ran
    it (a rank or an actor), `attempt` counts its tries in this run (an engine that hands a unit
    out again after its worker died passes 2, 3, ...); `on_chunk(docs, tokens)` follows progress.

    The piece is written under a temporary name of this attempt alone, so a stale attempt still
    running beside a retry can never publish a half-written file; the move into place is the only
    publish, and the done marker follows it."""
    from nerbatch.rows import output_columns, read_chunks

    options, out = plan.options, plan.out
    began = time.perf_counter()
    tally = Tally()
    writer = PartWriter(out.piece(unit), out.temporary(unit, f"{worker}-{attempt}-{os.getpid()}"), schema)
    slow = test_slowdown(worker)
    chunks = read_chunks(
        unit, tagger, options.text_column, options.carried, options.read_rows, has_id=bool(options.id_column)
    )

    def finish(chunk: Chunk, flight: InFlight) -> None:
        tally.fp32_batches += tagger.collect(flight)
        writer.write(output_columns(chunk, tagger, tally))
        on_chunk(len(chunk.texts), sum(d.n_tokens for d in chunk.documents()))
        gc_tuning.after_chunk()
        exit_if_asked(unit, attempt)
        if slow:
            time.sleep(slow)

    launched = previous = None
    try:
        for chunk in prefetch(chunks):
            # the model starts on this chunk before the previous one is decoded and written (on a GPU
            # and in CPU lanes they overlap; on a CPU without lanes it only changes the order of the work)
            launched = (chunk, tagger.launch(chunk.documents()))
            if previous:
                finish(*previous)
            previous = launched
        if previous:
            finish(*previous)
    except BaseException:
        for _, flight in filter(None, (launched, previous)):
            flight.cancel()
        writer.abandon()
        raise
    writer.publish()
    tally.seconds = time.perf_counter() - began
    out.mark_done(unit, vars(tally), worker)
    return tally


def test_slowdown(worker: int) -> float:
    """Seconds to sleep after each chunk, from the test hooks `SLOW_ENV` (every worker) and
    `SLOW_WORKER_ENV` (`INDEX:SECONDS`, one worker: a straggler)."""
    slow = float(os.environ.get(SLOW_ENV, "0"))
    index, _, seconds = os.environ.get(SLOW_WORKER_ENV, "").partition(":")
    if index and int(index) == worker:
        slow += float(seconds)
    return slow


def exit_if_asked(unit: Unit, attempt: int) -> None:
    """The test hook `EXIT_ENV` (`UNIT_NAME[:ATTEMPTS]`): die in the middle of that unit, on its first
    ATTEMPTS attempts (on every attempt without a count), as a process killed by the OOM killer does."""
    name, _, attempts = os.environ.get(EXIT_ENV, "").partition(":")
    if name == unit.name and (not attempts or attempt <= int(attempts)):
        os._exit(137)


def load_tagger(options: Options, device: str | None = None, choice: Choice | None = None) -> Tagger:
    """The checked model and tokenizer of `options.model` with the windowing/batching options, at
    the precision `choice` (default: `options.precision` as given)."""
    from nerbatch.inference import Tagger, cpu_lanes
    from nerbatch.modeling import load_token_classifier
    from nerbatch.precision import cast_bf16, quantize_int8, resolve_precision

    model, tokenizer = load_token_classifier(options.model, rust_tokenizer=True)
    if device:
        model.to(device)
    precision = resolve_precision(choice.precision if choice else options.precision, model.device)
    if precision == "int8":
        model = quantize_int8(model, tokenizer, inplace=True)  # the model is ours alone: no copy
    elif precision == "bf16" and model.device.type == "cpu":
        model = cast_bf16(model, inplace=True)
    tagger = Tagger(
        model,
        tokenizer,
        options.aggregation,
        options.max_length,
        options.stride,
        options.batch_size,
        options.max_batch_tokens,
        options.segment,
        precision,
        options.max_segment,
        lanes=cpu_lanes(model.device),
    )
    tagger.choice = choice
    return tagger


def choose_run_precision(
    plan: Plan, device_type: str, flags: frozenset[str] | None = None, evidence: dict | None = None
) -> Choice:
    """The one precision of the whole run (`nerbatch.autoprecision`): `flags` are the CPU flags all
    its workers share, `evidence` the model's precision record where this process cannot read the
    model; a rerun keeps the precision OUT_DIR's run was written at."""
    from nerbatch.autoprecision import choose_precision, local_model, warn_of_another_kernel

    previous, recorded = (None, None) if plan.options.overwrite else plan.out.recorded_precision()
    # with `evidence`, the record was read where the model is (a Ray driver's node may not hold it)
    local = local_model(plan.options.model) if evidence is None else None
    choice = choose_precision(plan.options.precision, device_type, local, flags, previous, evidence)
    warn_of_another_kernel(recorded, choice)
    return choice


def say_choice(choice: Choice) -> None:
    """Print the run's precision and why, once."""
    print(f"nerbatch annotate: {choice.describe()}", file=sys.stderr)


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
