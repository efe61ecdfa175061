"""The `nerbatch` command line: thin click commands over the stage modules."""

from __future__ import annotations

import click

from nerbatch import __version__
from nerbatch.inference import SEGMENTS
from nerbatch.spans import AGGREGATIONS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nerbatch")
def main() -> None:
    """Train a transformer NER model and annotate large Parquet corpora with it."""


def _fail(exc: Exception) -> None:
    """Turn an expected user error into a one-line message and exit status 1."""
    raise click.ClickException(str(exc)) from exc


@main.command("train")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A jobs/*.toml file; the options below override its keys.")
@click.option("--model", help="Hub model id or local directory (default bert-base-cased).")
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
@click.option("--label-all-subwords/--label-first-subword", default=None,
              help="Label continuation subwords with I- (reference) or ignore them.")
@click.option("--group-by-length/--no-group-by-length", default=None, help="Batch sentences of similar length.")
@click.option("--checkpoint-every", type=int, help="Optimizer steps between mid-epoch checkpoints.")
@click.option("--report-to", help="An accelerate tracker (tensorboard, wandb, ...).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output-dir.")
def train_cmd(config_path, resume, train_data, **options):
    """Fine-tune a token classifier (run under `accelerate launch` for several processes)."""
    from nerbatch.config import ConfigError, load_config
    from nerbatch.data import DataError
    from nerbatch.dist import LaunchError
    from nerbatch.modeling import ModelError
    from nerbatch.train import train

    try:
        cfg = load_config(config_path, {"train": train_data, **options})
        train(cfg, resume=resume)
    except (ConfigError, DataError, ModelError, LaunchError) as exc:
        _fail(exc)


@main.command("evaluate")
@click.argument("model_dir")
@click.argument("data")
@click.option("--split", default="validation", show_default=True, help="Split name for hub datasets.")
@click.option("--batch-size", default=32, show_default=True, help="Sentences per batch (sentence level).")
@click.option("--max-length", type=int, help="Subwords per input, special tokens included [default: the model's "
              "limit; with --documents, the window the model was trained on, as annotate].")
@click.option("--documents", is_flag=True, help="Score whole documents through annotate's code path (same "
              "segmentation, windows and decoding) instead of one sentence per input.")
@click.option("--document-column", help="Parquet/JSON Lines: the column naming each row's document.")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="first", show_default=True,
              help="With --documents: as annotate's --aggregation.")
@click.option("--stride", type=int, help="With --documents: as annotate's --stride.")
@click.option("--segment", type=click.Choice(SEGMENTS), help="With --documents: as annotate's --segment.")
def evaluate_cmd(model_dir, data, split, batch_size, max_length, documents, document_column, aggregation, stride,
                 segment):
    """Score MODEL_DIR on labelled DATA; the last line printed is the metrics as one JSON object.

    By default each sentence is scored on its own. With --documents, the documents of DATA (CoNLL
    -DOCSTART- lines, -DOCSTART- rows, or --document-column) are rebuilt as text (words joined by a
    space, sentences by a newline), annotated exactly as `nerbatch annotate` would, and each gold word
    takes the label of the first predicted span that overlaps it.
    """
    import json

    from nerbatch.data import DataError
    from nerbatch.dist import LaunchError, describe, process_state
    from nerbatch.evaluation import evaluate_dir
    from nerbatch.modeling import ModelError

    annotate_options = {"aggregation": aggregation, "max_length": max_length, "stride": stride, "segment": segment}
    try:
        metrics = evaluate_dir(model_dir, data, split, batch_size, max_length, documents=documents,
                               document_column=document_column, annotate_options=annotate_options)
    except (DataError, ModelError, LaunchError, ValueError) as exc:
        _fail(exc)
    state = process_state()
    if state.is_main_process:
        level = "document level (annotate)" if documents else "sentence level"
        click.echo(f"{model_dir} on {data}, {level}, evaluated on {describe(state.num_processes)}:")
        print_table(metrics)
        click.echo(json.dumps(metrics, sort_keys=True))


def print_table(metrics: dict) -> None:
    """Print per-type and overall precision / recall / F1 as an aligned table."""
    types = sorted(k for k, v in metrics.items() if isinstance(v, dict))
    click.echo(f"{'type':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'number':>8}")
    for name in types:
        m = metrics[name]
        click.echo(f"{name:<10}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['number']:>8}")
    click.echo(f"{'overall':<10}{metrics['overall_precision']:>10.4f}{metrics['overall_recall']:>10.4f}"
               f"{metrics['overall_f1']:>10.4f}   accuracy {metrics['overall_accuracy']:.4f}")


@main.command("predict")
@click.argument("model_dir")
@click.argument("text")
@click.option("--aggregation", default="first", show_default=True,
              type=click.Choice(AGGREGATIONS))
@click.option("--segment", type=click.Choice(SEGMENTS), help="As annotate's --segment [default: as the model "
              "was trained].")
@click.option("--max-length", type=int, help="As annotate's --max-length.")
def predict_cmd(model_dir, text, aggregation, segment, max_length):
    """Print the entities of TEXT as JSON lines (entity type, word, score, start, end)."""
    import json

    from nerbatch.inference import annotate_texts
    from nerbatch.modeling import ModelError, load_token_classifier

    try:
        model, tokenizer = load_token_classifier(model_dir)
    except ModelError as exc:
        _fail(exc)
    for span in annotate_texts([text], model, tokenizer, aggregation=aggregation, max_length=max_length,
                               segment=segment)[0]:
        click.echo(json.dumps({"entity_group": span.label, "word": span.text, "score": round(float(span.score), 4),
                               "start": span.start, "end": span.end}, ensure_ascii=False))


# Commands that live with their stage.
from nerbatch.annotate import annotate_command  # noqa: E402
from nerbatch.bench import bench_command  # noqa: E402
from nerbatch.demo import demo_command  # noqa: E402

for _command in (annotate_command, bench_command, demo_command):
    main.add_command(_command)
