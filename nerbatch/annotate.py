"""The annotate job: Parquet documents in, one row of word-level entity spans per document out.

Each process takes its share of the units (`nerbatch.shards`), and for each unit streams record
batches, tokenizes them in a background thread while the model runs on the previous chunk, writes
a zstd part file under a temporary name, publishes it atomically and records completion. A rerun
of the same command skips completed units and redoes the rest.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click

from nerbatch import __version__
from nerbatch.dist import LaunchError, process_state
from nerbatch.inference import SEGMENTS, Annotator, Document
from nerbatch.modeling import ModelError
from nerbatch.parquet_io import SOURCE_FIELDS, InputError, PartWriter, iter_batches, open_parquet, output_schema
from nerbatch.parquet_io import write_json_atomic
from nerbatch.shards import RunDir, Unit, discover_inputs, plan_units, units_for_rank
from nerbatch.spans import AGGREGATIONS

# Test hook (documented in tests/test_annotate_launch.py): sleep this many seconds after writing each
# record batch, so a test can SIGKILL the job while a part is half written.
SLOW_ENV = "NERBATCH_TEST_SLOW_BATCH_S"


@dataclass
class Options:
    """Everything the command line decides; the output-relevant part goes into config.json."""

    model: str
    inputs: list[str]
    output: Path
    text_column: str = "text"
    id_column: str | None = None
    aggregation: str = "first"
    max_length: int | None = None
    stride: int | None = None
    segment: str | None = None  # None: follow how the model was trained (see nerbatch.inference)
    batch_size: int = 64
    max_batch_tokens: int | None = None
    read_rows: int = 512
    overwrite: bool = False
    progress: bool = True

    @property
    def columns(self) -> list[str]:
        """The input columns the job reads: the text, and the id column when there is one."""
        return [self.text_column] + ([self.id_column] if self.id_column else [])


@dataclass
class Chunk:
    """One record batch, validated and tokenized: ids, texts, per-row errors and documents."""

    ids: dict[str, list]
    texts: list
    errors: list[str | None]
    docs: list[Document | None] = field(default_factory=list)


@dataclass
class Tally:
    rows: int = 0
    docs: int = 0
    flagged: int = 0
    tokens: int = 0
    windows: int = 0
    entities: int = 0
    seconds: float = 0.0

    def add(self, other: "Tally") -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def run(options: Options, rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
        device: str | None = None) -> Tally:
    """Annotate this rank's units. Raises `InputError` on bad input and `UnitsFailed` when units failed."""
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
        schema = output_schema(_id_fields(units, options.id_column), _metadata(config))
        bar = _Progress(sum(u.rows for u in mine), options.progress and rank == 0)
        for unit in mine:
            try:
                tally.add(annotate_unit(unit, annotator, options, out, schema, rank, bar))
            except Exception as exc:  # one corrupt file must not stop the other units
                message = f"{unit.describe()}: {type(exc).__name__}: {exc}"
                out.mark_failed(unit, message)
                failed.append((unit, message))
                click.echo(f"nerbatch annotate: unit {unit.name} failed: {message}", err=True)
        bar.close()
    write_json_atomic(out.meta / "stats" / f"rank-{rank:05d}-of-{world:05d}.json",
                      {**vars(tally), "units": len(mine), "failed": [m for _, m in failed],
                       "wall_seconds": time.time() - started})
    if failed:
        _wait_for_other_ranks(out, units, set(units_for_rank(units, rank, world)), started)
        raise UnitsFailed(failed)
    _write_totals_if_complete(out, units, config)
    return tally


class UnitsFailed(RuntimeError):
    """Some units raised; their files are named and the other units' parts are complete."""

    def __init__(self, failed: list[tuple[Unit, str]]):
        lines = "\n".join(f"  {unit.name}: {message}" for unit, message in failed)
        super().__init__(f"{len(failed)} unit(s) failed (their outputs were not written; fix the input and rerun "
                         f"the same command to finish them):\n{lines}")


def annotate_unit(unit: Unit, annotator: Annotator, options: Options, out: RunDir, schema, rank: int, bar) -> Tally:
    """Annotate one unit into its part file, publish it and record completion."""
    began = time.perf_counter()
    tally = Tally()
    writer = PartWriter(out.part(unit), out.temporary(unit, rank), schema)
    slow = float(os.environ.get(SLOW_ENV, "0"))
    try:
        for chunk in prefetch(_chunks(unit, annotator, options)):
            annotator.forward([d for d in chunk.docs if d is not None])
            writer.write(_rows(chunk, annotator, tally))
            bar.advance(len(chunk.texts), sum(d.n_tokens for d in chunk.docs if d is not None))
            if slow:
                time.sleep(slow)
    except BaseException:
        writer.abandon()
        raise
    writer.publish()
    tally.seconds = time.perf_counter() - began
    out.mark_done(unit, vars(tally))
    return tally


def _chunks(unit: Unit, annotator: Annotator, options: Options) -> Iterator[Chunk]:
    """Read, validate and tokenize the unit's record batches (runs in the prefetch thread)."""
    row = unit.first_row
    for batch in iter_batches(Path(unit.path), unit.row_group, options.columns, options.read_rows):
        texts = batch.column(options.text_column).to_pylist()
        if options.id_column:
            ids = {options.id_column: batch.column(options.id_column).to_pylist()}
        else:
            ids = {"source_file": [unit.path] * len(texts), "row_index": list(range(row, row + len(texts)))}
        row += len(texts)
        errors = [text_error(t) for t in texts]
        good = [t for t, e in zip(texts, errors) if e is None]
        encoded = iter(annotator.encode(good))
        docs = [next(encoded) if e is None else None for e in errors]
        # e.g. only control or zero-width characters: nothing reaches the model, so say so
        errors = [NO_TOKENS if d is not None and d.n_tokens == 0 else e for d, e in zip(docs, errors)]
        docs = [d if e is None else None for d, e in zip(docs, errors)]
        yield Chunk(ids, texts, errors, docs)


NO_TOKENS = "no tokens (the tokenizer keeps no character of this text)"


def text_error(value) -> str | None:
    """Why a text cell cannot be annotated, or None when it can."""
    if value is None:
        return "null text"
    if not isinstance(value, str):
        return f"non-string text ({type(value).__name__})"
    if not value:
        return "empty text"
    if value.isspace():
        return "whitespace-only text"
    return None


def _rows(chunk: Chunk, annotator: Annotator, tally: Tally) -> dict[str, list]:
    entities, windows = [], []
    for text, doc in zip(chunk.texts, chunk.docs):
        if doc is None:
            entities.append([])
            windows.append(0)
            continue
        spans = annotator.decode(doc, text)
        entities.append([s.as_dict() for s in spans])
        windows.append(len(doc.windows))
        tally.tokens += doc.n_tokens
        tally.windows += len(doc.windows)
        tally.entities += len(spans)
    flagged = sum(e is not None for e in chunk.errors)
    tally.rows += len(chunk.texts)
    tally.flagged += flagged
    tally.docs += len(chunk.texts) - flagged
    return {**chunk.ids, "entities": entities, "error": chunk.errors, "n_windows": windows}


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, `depth` ahead, re-raising its errors here.

    The fast tokenizer and Parquet decoding release the GIL, so they overlap with the model.
    """
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(item)
            box.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it with its traceback
            box.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def run_config(options: Options, units: list[Unit], annotator: Annotator) -> dict:
    """The facts that determine the output; a rerun into the same OUT_DIR must have the same ones."""
    return {
        "model": str(Path(options.model).resolve()) if Path(options.model).exists() else options.model,
        "model_fingerprint": model_fingerprint(options.model),
        "labels": annotator.labels,
        "options": {"text_column": options.text_column, "id_column": options.id_column, **annotator.settings()},
        "inputs": [[u.path, u.row_group, u.rows] for u in units],
    }


def model_fingerprint(model: str) -> str:
    """A hash of a local model dir: config, tokenizer and every byte of the weights files (a
    sequential read, about a second per GB; two checkpoints of one size can differ anywhere)."""
    root = Path(model)
    if not root.is_dir():
        return model
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.name in {"config.json", "tokenizer.json", "tokenizer_config.json"} or \
                path.suffix in {".safetensors", ".bin", ".pt"}:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def _metadata(config: dict) -> dict:
    return {"model": config["model"], "labels": config["labels"], "options": config["options"],
            "version": __version__}


def _id_fields(units: list[Unit], id_column: str | None):
    if not id_column:
        return SOURCE_FIELDS
    return [open_parquet(Path(units[0].path)).schema_arrow.field(id_column)] if units else []


def load_annotator(options: Options, device: str | None = None) -> Annotator:
    """The model and tokenizer of `options.model` with the windowing/batching options."""
    from nerbatch.modeling import load_token_classifier

    model, tokenizer = load_token_classifier(options.model)
    if device:
        model.to(device)
    return Annotator(model, tokenizer, options.aggregation, options.max_length, options.stride, options.batch_size,
                     options.max_batch_tokens, options.segment)


class _Progress:
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


def _write_totals_if_complete(out: RunDir, units: list[Unit], config: dict) -> None:
    """Whoever finds every unit done writes the run totals (several may: same content, atomic write)."""
    if not all(out.is_done(u) for u in units):
        return
    total = Tally()
    for unit in units:
        stats = out.unit_stats(unit)
        total.add(Tally(**{k: stats[k] for k in vars(Tally())}))
    write_json_atomic(out.meta / "stats.json", {"complete": True, "units": len(units), **vars(total),
                                                "model": config["model"], "options": config["options"]})


def _wait_for_other_ranks(out: RunDir, units: list[Unit], mine: set, since: float, poll: float = 2.0,
                          stall: float = 1800.0) -> None:
    """Before a failing rank exits (non-zero), wait until the other ranks have finished their units:
    the launcher kills all processes when one fails, which would waste their work in progress.
    Gives up when no other unit has settled for `stall` seconds (a rank that died without a trace)."""
    others = [u for u in units if u not in mine]

    def settled(unit: Unit) -> bool:
        failure = out.failure(unit)
        return out.is_done(unit) or failure.exists() and failure.stat().st_mtime >= since

    count, changed = -1, time.monotonic()
    while (now := sum(map(settled, others))) < len(others):
        if now != count:
            count, changed = now, time.monotonic()
        elif time.monotonic() - changed > stall:
            click.echo(f"nerbatch annotate: no other unit finished in {stall:.0f} s; exiting", err=True)
            return
        time.sleep(poll)


@click.command("annotate")
@click.argument("model_dir")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the part files (created; rerun into it to resume).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the document text.")
@click.option("--id-column", default=None, help="Column copied to the output to identify each row "
              "(default: source_file and row_index).")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="first", show_default=True,
              help="How subword predictions become spans, as in the transformers pipeline; first/average/max "
              "keep spans on word boundaries.")
@click.option("--segment", type=click.Choice(SEGMENTS), default=None, help="What a window holds: one sentence "
              "(`sentences`) or running text (`none`) [default: as the model was trained: `none` for nerbatch "
              "models trained with document context, `sentences` for others].")
@click.option("--max-length", type=int, default=None, help="Subwords per window, special tokens included "
              "[default: the window a document-context model was trained on, else the model's limit].")
@click.option("--stride", type=int, default=None, help="Overlap between consecutive windows, in subwords, at "
              "most half a window [default: a quarter of a window].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Most windows per forward pass.")
@click.option("--max-batch-tokens", type=int, default=None, help="Most padded subwords per forward pass "
              "[default: 1024 on CPU, 32768 on GPU].")
@click.option("--read-rows", type=int, default=512, show_default=True, help="Rows read and tokenized at a time.")
@click.option("--overwrite", is_flag=True, help="Delete OUT_DIR's earlier output instead of refusing a different run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def annotate_command(model_dir, inputs, output, text_column, id_column, aggregation, segment, max_length, stride,
                     batch_size, max_batch_tokens, read_rows, overwrite, no_progress):
    """Annotate Parquet documents with entity spans.

    MODEL_DIR is a token-classification model (a `nerbatch train` output or a hub id); INPUTS are
    Parquet files, directories or glob patterns. Writes one output row per input row: the id
    column(s), `entities` (start, end, label, text, score; character offsets, end exclusive),
    `error` (why a row was skipped) and `n_windows`.

    Run it plainly for one process, or under `accelerate launch -m nerbatch annotate ...` to split
    the work over processes and machines. Rerun the same command after a crash or preemption: done
    units are skipped, unfinished ones redone.
    """
    try:
        state = process_state()
    except LaunchError as exc:  # two processes both believing they are rank 0 would collide
        raise click.ClickException(str(exc)) from exc
    # SIGTERM (SLURM preemption, the launcher stopping a failed job) unwinds through `finally` like Ctrl-C.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    options = Options(model_dir, list(inputs), output, text_column, id_column, aggregation, max_length, stride,
                      segment, batch_size, max_batch_tokens, read_rows, overwrite, not no_progress)
    try:
        tally = run(options, state.process_index, state.num_processes, state.wait_for_everyone,
                    None if state.device.type == "cpu" else str(state.device))
    except (InputError, UnitsFailed, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if tally.rows:
        click.echo(f"rank {state.process_index}: {tally.rows} rows ({tally.flagged} flagged), {tally.tokens} tokens, "
                   f"{tally.entities} entities in {tally.seconds:.1f}s", err=True)



def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)
