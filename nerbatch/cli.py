"""The `nerbatch` command line: every command is defined here, as a thin click wrapper over its stage
module (imported inside the command, so `nerbatch --help` stays fast).

To add a command: write the work as a function in its stage module, raising `NerbatchError`
subclasses for user errors, then add a `@main.command` here that parses options and calls it. The
group turns any `NerbatchError` into a one-line message and exit status 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from nerbatch import __version__, allocator, gc_tuning
from nerbatch.errors import NerbatchError
from nerbatch.options import AGGREGATIONS, PRECISIONS, SEGMENTS, Options


class Commands(click.Group):
    """A click group that prints user errors (`NerbatchError`) as one line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NerbatchError as exc:
            raise click.ClickException(str(exc)) from exc


MAX_SEGMENT_HELP = (
    "Sentence view: a segment longer than this many subwords (text without line breaks runs headlines, "
    "datelines and tables together) is cut at its strongest boundaries; 0: no cap [default: the length "
    "the model was trained on, as `nerbatch train` records it; no cap for other models]."
)


def choice_option(name: str, choices, default, help: str, show_default: bool = True):
    """An option taking one of `choices`."""
    return click.option(name, type=click.Choice(choices), default=default, show_default=show_default, help=help)


def count_option(name: str, default, help: str, show_default: bool = False):
    """An option taking a whole number of at least 1."""
    return click.option(name, type=click.IntRange(min=1), default=default, show_default=show_default, help=help)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nerbatch")
def main() -> None:
    """Train a transformer NER model and annotate large Parquet corpora with it."""


@main.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="A jobs/*.toml file; the options below override its keys.",
)
@click.option("--model", help="Hub model id, local directory, or package:NAME/PATH (default bert-base-cased).")
@click.option("--train", "train_data", help="Training data: hub dataset name or a CoNLL/Parquet/JSONL path.")
@click.option("--validation", help="Validation data: hub dataset name or a local path.")
@click.option("--output-dir", help="Where epochs, checkpoints and the best model go.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int, help="Per-process batch size.")
@click.option("--eval-batch-size", type=int)
@click.option("--lr", type=float, help="Peak learning rate of AdamW.")
@click.option("--weight-decay", type=float)
@click.option("--warmup-ratio", type=float, help="Fraction of updates with linear warm-up.")
@click.option("--max-length", type=int, help="Subwords per feature (default: the model's limit).")
@click.option("--seed", type=int)
@click.option("--keep-checkpoints", type=int, help="How many checkpoints to keep (oldest deleted).")
@click.option("--max-train-samples", type=int, help="Use only the first N training sentences.")
@click.option("--max-eval-samples", type=int, help="Use only the first N validation sentences.")
@click.option("--gradient-accumulation-steps", type=int)
@click.option(
    "--micro-batch-tokens",
    type=int,
    help="Run a batch of more subwords (rows x padded length) in slices: the same gradient, less peak memory "
    "(0: whole batches).",
)
@click.option(
    "--label-all-subwords/--label-first-subword",
    default=None,
    help="Label continuation subwords with I- (reference) or ignore them.",
)
@click.option("--group-by-length/--no-group-by-length", default=None, help="Batch sentences of similar length.")
@choice_option(
    "--context",
    ["sentence", "document"],
    None,
    "Train on single sentences, or also "
    "on windows of neighbouring sentences of each document (the way annotate shows running text).",
    show_default=False,
)
@click.option(
    "--context-window",
    type=int,
    help="With --context document: the longest window, special tokens "
    "included; annotate's default window for the model.",
)
@click.option(
    "--lone-share",
    type=float,
    help="With --context document: the share of sentences also trained on their own in an epoch, drawn "
    "anew each epoch (every sentence is in a window every epoch) [default: 1].",
)
@choice_option(
    "--select-by",
    ["auto", "document", "sentence"],
    None,
    "Validation score that picks the best epoch (auto: document level when the validation data has documents).",
    show_default=False,
)
@click.option("--document-column", help="Parquet/JSON Lines data: the column naming each row's document.")
@click.option("--checkpoint-every", type=int, help="Optimizer steps between mid-epoch checkpoints.")
@click.option("--report-to", help="An accelerate tracker (tensorboard, wandb, ...).")
@click.option(
    "--check-int8/--no-check-int8",
    default=None,
    help="At the end, score the best model at int8 against fp32 on CPU (as check-precision does), so that "
    "annotate's --precision auto may run it at int8 [default: on].",
)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output-dir.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an earlier training run in --output-dir (without it, one is an error)."
)
def train_cmd(config_path, resume, overwrite, train_data, **options):
    """Fine-tune a token classifier (run under `accelerate launch` for several processes)."""
    from nerbatch.config import load_config
    from nerbatch.train import train

    train(load_config(config_path, {"train": train_data, **options}), resume=resume, overwrite=overwrite)


@main.command("evaluate")
@click.argument("model_dir")
@click.argument("data")
@click.option("--split", default="validation", show_default=True, help="Split name for hub datasets.")
@count_option("--batch-size", 32, "Sentences per batch (sentence level).", show_default=True)
@count_option(
    "--max-length",
    None,
    "Subwords per input, special tokens included [default: the model's "
    "limit; with --documents, the window the model was trained on, as annotate].",
)
@click.option(
    "--documents",
    is_flag=True,
    help="Score whole documents through annotate's code path (same "
    "segmentation, windows and decoding) instead of one sentence per input.",
)
@click.option("--document-column", help="Parquet/JSON Lines: the column naming each row's document.")
@choice_option("--aggregation", AGGREGATIONS, Options.aggregation, "With --documents: as annotate's --aggregation.")
@click.option("--stride", type=int, help="With --documents: as annotate's --stride.")
@click.option("--segment", type=click.Choice(SEGMENTS), help="With --documents: as annotate's --segment.")
@click.option("--max-segment", type=click.IntRange(min=0), help="With --documents: as annotate's --max-segment.")
@choice_option(
    "--join",
    ("newline", "space"),
    "newline",
    "With --documents: join a document's sentences by a newline (a tidy text dump) or by a space (text "
    "extracted from HTML or PDFs, with no line breaks).",
)
@choice_option("--precision", PRECISIONS, Options.precision, "As annotate's --precision (both levels).")
def evaluate_cmd(
    model_dir, data, split, batch_size, max_length, documents, document_column, aggregation, stride, segment,
    max_segment, join, precision,
):  # fmt: skip
    """Score MODEL_DIR on labelled DATA; the last line printed is the metrics as one JSON object.

    By default each sentence is scored on its own. With --documents, the documents of DATA (CoNLL
    -DOCSTART- lines, -DOCSTART- rows, or --document-column) are rebuilt as text (words joined by a
    space, sentences by a newline or, with --join space, a space), annotated exactly as `nerbatch
    annotate` would, and each gold word takes the label of the first predicted span that overlaps it.
    """
    from nerbatch.dist import describe, process_state, shut_down
    from nerbatch.evaluation import evaluate_dir

    annotate_options = {
        "aggregation": aggregation,
        "max_length": max_length,
        "stride": stride,
        "segment": segment,
        "max_segment": max_segment,
        "precision": precision,
    }
    try:
        metrics = evaluate_dir(
            model_dir,
            data,
            split,
            batch_size,
            max_length,
            documents=documents,
            document_column=document_column,
            annotate_options=annotate_options,
            join=join,
        )
        state = process_state()
        if state.is_main_process:
            level = "document level (annotate)" if documents else "sentence level"
            click.echo(f"{model_dir} on {data}, {level}, evaluated on {describe(state.num_processes)}:")
            print_table(metrics)
            click.echo(json.dumps(metrics, sort_keys=True))
    finally:
        shut_down()


def print_table(metrics: dict) -> None:
    """Print per-type and overall precision / recall / F1 as an aligned table."""
    types = sorted(k for k, v in metrics.items() if isinstance(v, dict))
    click.echo(f"{'type':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'number':>8}")
    for name in types:
        m = metrics[name]
        click.echo(f"{name:<10}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['number']:>8}")
    click.echo(
        f"{'overall':<10}{metrics['overall_precision']:>10.4f}{metrics['overall_recall']:>10.4f}"
        f"{metrics['overall_f1']:>10.4f}   accuracy {metrics['overall_accuracy']:.4f}"
    )


@main.command("check-precision")
@click.argument("model_dir")
@click.argument("data")
@click.option("--split", default="validation", show_default=True, help="Split name for hub datasets.")
@click.option("--document-column", help="Parquet/JSON Lines: the column naming each row's document.")
@click.option("--tokens-column", default="tokens", show_default=True, help="Parquet/JSON Lines: the words column.")
@click.option("--tags-column", default="ner_tags", show_default=True, help="Parquet/JSON Lines: the tags column.")
@click.option(
    "--precision",
    "precisions",
    type=click.Choice(["int8", "bf16"]),
    multiple=True,
    help="A reduced precision to check (repeatable) [default: int8, and bf16 where this CPU computes in it].",
)
def check_precision_cmd(model_dir, data, split, document_column, tokens_column, tags_column, precisions):
    """Score MODEL_DIR on labelled DATA at fp32 and at reduced precisions, on CPU, and record the result
    beside its weights: `--precision auto` runs int8 only for a model whose int8 check lost at most
    0.003 F1 at sentence and at document level."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the check is of the CPU's precisions, on the CPU, even on a GPU box
    from nerbatch.autoprecision import PRECISION_RECORD, TOLERANCE, check_model, checkable

    columns = {"tokens_column": tokens_column, "tags_column": tags_column}
    record = check_model(model_dir, data, list(precisions) or checkable(), split, document_column, **columns)
    click.echo(f"{'precision':<10}{'level':<10}{'fp32 f1':>10}{'f1':>10}{'change':>10}  verdict")
    for precision, check in record["checks"].items():
        if precisions and precision not in precisions:
            continue
        for level in check["levels"]:
            fp32, f1 = check["f1"][level]["fp32"], check["f1"][level][precision]
            verdict = "passed" if f1 - fp32 >= -TOLERANCE else f"lost more than {TOLERANCE}"
            click.echo(f"{precision:<10}{level:<10}{fp32:>10.4f}{f1:>10.4f}{f1 - fp32:>+10.4f}  {verdict}")
    click.echo(f"recorded in {Path(model_dir) / PRECISION_RECORD}", err=True)


@main.command("predict")
@click.argument("model_dir")
@click.argument("text")
@click.option("--aggregation", default=Options.aggregation, show_default=True, type=click.Choice(AGGREGATIONS))
@click.option(
    "--segment", type=click.Choice(SEGMENTS), help="As annotate's --segment [default: as the model was trained]."
)
@click.option("--max-length", type=click.IntRange(min=1), help="As annotate's --max-length.")
@choice_option("--precision", PRECISIONS, Options.precision, "As annotate's --precision.")
def predict_cmd(model_dir, text, aggregation, segment, max_length, precision):
    """Print the entities of TEXT as JSON lines (entity type, word, score, start, end)."""
    import torch

    from nerbatch.autoprecision import choose_precision, local_model
    from nerbatch.inference import tag_texts
    from nerbatch.modeling import load_token_classifier

    model, tokenizer = load_token_classifier(model_dir, rust_tokenizer=True)
    if torch.cuda.is_available():  # as annotate: the GPU when there is one
        model.to("cuda")
    choice = choose_precision(precision, model.device.type, local_model(model_dir))
    options = dict(aggregation=aggregation, max_length=max_length, segment=segment, precision=choice.precision)
    for span in tag_texts([text], model, tokenizer, **options)[0]:
        click.echo(
            json.dumps(
                {
                    "entity_group": span.label,
                    "word": span.text,
                    "score": round(float(span.score), 4),
                    "start": span.start,
                    "end": span.end,
                },
                ensure_ascii=False,
            )
        )


@main.command("annotate")
@click.argument("model_dir")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--output",
    "-o",
    "output",
    required=True,
    help="Directory or URI (s3://, gs://, hdfs://, file://, ...) for the output files (created; rerun into "
    "it to resume).",
)
@click.option("--text-column", default=Options.text_column, show_default=True, help="Column holding the document text.")
@click.option(
    "--id-column",
    default=Options.id_column,
    help="Column copied to the output to identify each row (default: source_file and row_index).",
)
@choice_option(
    "--aggregation",
    AGGREGATIONS,
    Options.aggregation,
    "How subword predictions become spans, as in the transformers pipeline; first/average/max "
    "keep spans on word boundaries.",
)
@choice_option(
    "--segment",
    SEGMENTS,
    Options.segment,
    "What a window holds: one sentence (`sentences`), running text (`none`), or both views averaged "
    "(`both`, twice the compute) [default: what `nerbatch train` recorded as best for the model; "
    "`sentences` for other models].",
    show_default=False,
)
@click.option(
    "--max-segment",
    type=click.IntRange(min=0),
    default=Options.max_segment,
    help=MAX_SEGMENT_HELP,
)
@count_option(
    "--max-length",
    Options.max_length,
    "Subwords per window, special tokens included [default: the window a document-context model was "
    "trained on; 128 for the running-text view of --segment both; else the model's limit].",
)
@click.option(
    "--stride",
    type=int,
    default=Options.stride,
    help="Overlap between consecutive windows, in subwords, at most half a window [default: a quarter of a window].",
)
@choice_option(
    "--precision",
    PRECISIONS,
    Options.precision,
    "Numeric precision: auto = fp16 on a GPU (a batch that overflows runs again in fp32); on CPU, bf16 where "
    "the CPU computes in bf16, else fp32, or int8 for a model whose int8 check passed where int8 is the faster "
    "(see docs/annotate.md). The choice and its reason are printed and recorded in the output metadata.",
)
@count_option("--batch-size", Options.batch_size, "Most windows per forward pass [default: 64 on CPU, 1024 on GPU].")
@count_option(
    "--max-batch-tokens",
    Options.max_batch_tokens,
    "Most padded subwords per forward pass [default: 1024 on CPU, 32768 on GPU].",
)
@count_option("--read-rows", Options.read_rows, "Rows read and tokenized at a time.", show_default=True)
@click.option(
    "--keep-columns",
    default="",
    help="Input columns copied to every output row with their types, comma-separated (e.g. date,title).",
)
@click.option(
    "--partition-by",
    default=Options.partition_by,
    help="An input column: output files go to Hive-style COLUMN=value/ directories that DuckDB, Polars "
    "and Spark prune on (values must be safe directory names; checked before any work).",
)
@count_option(
    "--row-group-rows", Options.row_group_rows, "Rows per output row group (each file's last may be smaller).", True
)
@count_option(
    "--file-rows", Options.file_rows, "About this many rows per output file (files hold whole input row groups).", True
)
@click.option("--overwrite", is_flag=True, help="Delete OUT_DIR's earlier output instead of refusing a different run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@choice_option(
    "--engine",
    ("ranks", "ray"),
    "ranks",
    "Who runs the units: this process, or the ranks accelerate launch / torchrun started (ranks); or a pool "
    "of Ray actors fed units on demand (ray: pip install 'nerbatch[ray]').",
)
@click.option(
    "--ray-address",
    default=None,
    help="--engine ray: the cluster to join (host:port, ray://host:port, auto) [default: $RAY_ADDRESS, else a "
    "local cluster on this machine].",
)
@count_option("--actors", None, "--engine ray: actors [default: as many as the cluster's GPUs or CPUs hold].")
@click.option(
    "--gpus-per-actor",
    type=click.FloatRange(min=0),
    default=None,
    help="--engine ray: GPUs of each actor; a fraction shares a GPU [default: 0.25 on a cluster with GPUs, else 0].",
)
@click.option(
    "--cpus-per-actor",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="--engine ray: CPUs of each actor (its tokenizer and torch threads) [default: 4 with GPUs, else 1].",
)
@count_option(
    "--max-attempts",
    3,
    "--engine ray: times a unit is handed out when its actor dies, then it is recorded failed.",
    True,
)
def annotate_cmd(
    model_dir, inputs, output, no_progress, keep_columns, engine, ray_address, actors, gpus_per_actor, cpus_per_actor,
    max_attempts, **options,
):  # fmt: skip
    """Annotate Parquet documents with entity spans.

    MODEL_DIR is a token-classification model (a `nerbatch train` output or a hub id); INPUTS are
    Parquet files, directories or glob patterns. Writes one output row per input row: the id
    column(s), the kept columns, `entities` (start, end, label, text, score; character offsets, end
    exclusive), `error` (why a row was skipped) and `n_windows`, in files of about --file-rows rows
    assembled once their input row groups are done.

    Run it plainly for one process, or under `accelerate launch -m nerbatch annotate ...` to split
    the work over processes and machines; or with --engine ray on a Ray cluster. Rerun the same
    command after a crash or preemption (with either engine): done units are skipped, unfinished
    ones redone.
    """
    kept = [c.strip() for c in keep_columns.split(",") if c.strip()]
    run = Options(
        model=model_dir, inputs=list(inputs), output=output, progress=not no_progress, keep_columns=kept, **options
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from nerbatch.shards import shell_expanded_warning

    expanded = shell_expanded_warning(list(inputs))  # said once: by the Ray driver, or by rank 0
    if engine == "ray":
        if expanded:
            click.echo(expanded, err=True)
        from nerbatch.engines.ray_actors import RayOptions, annotate_with_ray

        settings = RayOptions(ray_address, actors, gpus_per_actor, cpus_per_actor, max_attempts)
        tally = annotate_with_ray(run, settings)
        click.echo(
            f"ray: {tally.rows} rows ({tally.flagged} flagged), {tally.tokens} tokens, {tally.entities} entities",
            err=True,
        )
        return
    ray_only = {"--ray-address": ray_address, "--actors": actors, "--gpus-per-actor": gpus_per_actor}
    for name, value in {**ray_only, "--cpus-per-actor": cpus_per_actor}.items():
        if value is not None:
            raise click.BadParameter(f"{name} is for --engine ray", param_hint=name)
    from nerbatch.dist import barrier, gather_objects, process_state, shares_gpus, shut_down
    from nerbatch.engines.ranks import annotate_units

    # Two processes both believing they are rank 0 would collide: checked here. The job's one
    # collective is a barrier: processes sharing a GPU form a gloo group (NCCL refuses two ranks on
    # one device); otherwise accelerate's choice stands (NCCL finds its network by itself).
    state = process_state(backend="gloo" if shares_gpus() else None)
    if expanded and state.is_main_process:
        click.echo(expanded, err=True)
    try:
        tally = annotate_units(
            run,
            state.process_index,
            state.num_processes,
            lambda: barrier(state),
            None if state.device.type == "cpu" else str(state.device),
            gather_objects,
        )
    finally:
        shut_down()
    if tally.rows:
        click.echo(
            f"rank {state.process_index}: {tally.rows} rows ({tally.flagged} flagged), {tally.tokens} tokens, "
            f"{tally.entities} entities in {tally.seconds:.1f}s"
            + (f"; {tally.fp32_batches} batches overflowed fp16 and ran again in fp32" if tally.fp32_batches else ""),
            err=True,
        )


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM (SLURM preemption, the launcher stopping a failed job) unwinds through `finally` like Ctrl-C."""
    sys.exit(128 + signum)


@main.command("stats")
@click.argument("out_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def stats_cmd(out_dir, as_json):
    """Summarise an annotate OUT_DIR: units done/failed/missing, rows, flagged rows by reason,
    entities by label, throughput per rank."""
    from nerbatch.stats import collect_stats, format_stats

    stats = collect_stats(out_dir)
    click.echo(json.dumps(stats, sort_keys=True) if as_json else format_stats(stats))


@main.command("show")
@click.argument("out_dir")
@click.option("--sample", type=click.IntRange(min=1), default=5, show_default=True, help="Documents to show.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample (same seed, same documents).")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write one self-contained HTML page here instead of printing to the terminal.",
)
def show_cmd(out_dir, sample, seed, html_path):
    """Show a sample of annotated documents with their entities highlighted (texts are read back
    from the run's inputs)."""
    from nerbatch.show import render_html, render_terminal, sample_documents

    if html_path and not html_path.parent.is_dir():  # before reading the sample back
        raise click.BadParameter(f"{html_path.parent} is not a directory", param_hint="--html")
    docs = sample_documents(out_dir, sample, seed)
    if html_path:
        html_path.write_text(render_html(docs, f"nerbatch: {out_dir}"), encoding="utf-8")
        click.echo(f"{len(docs)} documents written to {html_path}", err=True)
    else:
        click.echo(render_terminal(docs, color=sys.stdout.isatty()))


@main.command("demo")
@click.option("--model", default=None, help="Encoder to fine-tune (default: the MiniLM package's directory).")
@click.option(
    "--dataset", default=None, help="Hub dataset to train on instead of the shipped sample (e.g. lhoestq/conll2003)."
)
@click.option("--output-dir", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", default=8, show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--show", default=4, show_default=True, help="Documents to print with their entities.")
def demo_cmd(model, dataset, output_dir, epochs, lr, show):
    """Fine-tune, evaluate, annotate with 2 processes and summarise, on shipped sample data.

    With hub access, `nerbatch demo --model bert-base-cased --dataset lhoestq/conll2003 --epochs 3 --lr 2e-5`
    runs the reference recipe instead of the offline sample.
    """
    from nerbatch.demo import run_demo

    run_demo(model, dataset, output_dir, epochs, lr, show)


def run() -> None:
    """The console entry point (`nerbatch`, `python -m nerbatch`): the CLI, on tcmalloc or jemalloc
    where installed (`nerbatch.allocator`), with the garbage collector set for a process that starts
    big and exits at once (`nerbatch.gc_tuning`). In-process callers, such as tests, call `main` and
    keep the default allocator and collector."""
    allocator.use_fast_allocator()
    gc_tuning.begin()
    try:
        main()
    finally:
        gc_tuning.freeze_for_exit()
