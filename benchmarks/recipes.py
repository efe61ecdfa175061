"""Trained recipes side by side: validation F1 at sentence level and on documents joined by newlines
and by spaces (annotate's defaults for each model, fp32), with each run's training time and peak
memory, all through the `nerbatch` commands users run.

    python -m benchmarks.recipes ../shared/data/conll2003/valid.txt \
        --model sentence=runs/minilm-conll2003 --model document=runs/minilm-conll2003-document \
        --options sentence="--max-segment 162" \
        --train-log document=LOG_OF_/usr/bin/time_-v --json-out benchmarks/results/recipes-KIND.json

`--options NAME="..."` adds evaluate options for one model's document scores (e.g. the segment cap
`nerbatch train` records today, for a model trained before it did). `--train-log NAME=PATH` reads
the peak RSS from `/usr/bin/time -v`'s output of that model's training run. Training seconds come
from the model's metrics.json (per epoch, without validation).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click

from benchmarks.common import report_header, write_report
from nerbatch.cpu import describe_cpu

LEVELS = {"sentence": [], "newline": ["--documents", "--join", "newline"], "space": ["--documents", "--join", "space"]}


def evaluate(model_dir: str, data: str, extra: list[str]) -> dict:
    """One `nerbatch evaluate` process at fp32; its metrics (the last line, JSON)."""
    cmd = [sys.executable, "-m", "nerbatch", "evaluate", model_dir, data, "--precision", "fp32", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def training_record(model_dir: str) -> dict:
    """Epochs, best epoch and training seconds from the model's metrics.json."""
    metrics = json.loads((Path(model_dir) / "metrics.json").read_text())
    seconds = [e["train_seconds"] for e in metrics["epochs"]]
    return {"epochs": len(seconds), "best_epoch": metrics["best_epoch"], "train_seconds": sum(seconds)}


def peak_rss_mib(log: Path) -> float:
    """'Maximum resident set size (kbytes)' of a `/usr/bin/time -v` report, in MiB."""
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text(errors="replace"))
    if not found:
        raise click.ClickException(f"{log}: no 'Maximum resident set size' line (a /usr/bin/time -v report?)")
    return int(found.group(1)) / 1024


def pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep:
            raise click.BadParameter(f"{value!r}: write NAME=VALUE", param_hint=what)
        out[name] = rest
    return out


@click.command()
@click.argument("data")
@click.option("--model", "models", multiple=True, required=True, help="NAME=MODEL_DIR, repeatable.")
@click.option("--options", "options", multiple=True, help='NAME="evaluate options" for that model\'s documents.')
@click.option("--train-log", "logs", multiple=True, help="NAME=PATH of /usr/bin/time -v output of its training.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(data, models, options, logs, json_out) -> None:
    models, options, logs = pairs(models, "--model"), pairs(options, "--options"), pairs(logs, "--train-log")
    rows = {}
    for name, model_dir in models.items():
        row = {"model": model_dir, "options": options.get(name, ""), **training_record(model_dir)}
        for level, args in LEVELS.items():
            extra = args + (shlex.split(options.get(name, "")) if args else [])
            row[level] = round(evaluate(model_dir, data, extra)["overall_f1"], 4)
        if name in logs:
            row["train_peak_rss_mib"] = round(peak_rss_mib(Path(logs[name])))
        rows[name] = row
        click.echo(f"{name}: {row}")
    click.echo(f"\n{describe_cpu()}\nvalidation F1 (fp32, annotate defaults per model):")
    header = ["sentence", "newline", "space", "space-nl", "train s", "peak MiB"]
    click.echo(f"{'recipe':<12}" + "".join(f"{h:>10}" for h in header))
    for name, row in rows.items():
        rss = row.get("train_peak_rss_mib", "-")
        click.echo(
            f"{name:<12}{row['sentence']:>10.4f}{row['newline']:>10.4f}{row['space']:>10.4f}"
            f"{row['space'] - row['newline']:>+10.4f}{row['train_seconds']:>10.0f}{rss:>10}"
        )
    report = {
        **report_header("recipes"),
        "data": data,
        "recipes": rows,
    }
    write_report(report, json_out)


if __name__ == "__main__":
    main()
