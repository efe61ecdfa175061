"""Start-up of whole `nerbatch annotate` processes: from launch to the first document, and the wall
time, per way of loading the model, interleaved rounds, medians:

- `plain torch`: as shipped (a BERT checkpoint runs as `nerbatch.encoder`, transformers not imported);
- `transformers`: the same command with the model and tokenizer loaded by transformers' Auto
  classes (the path of releases before 0.5.0, and of non-BERT models today);
- `default collector`: as shipped but through the CLI's `main`, with Python's default collector.

    python -m benchmarks.startup MODEL_DIR ../shared/data/reuters21578/reuters21578.parquet --docs 50 \
        --precision auto --rounds 7 --json-out benchmarks/results/startup-KIND.json

Start-up is the rank's `work_started_at` (stats/rank-*.json) less the launch time. The documents are
bench.py's (the first DOCS non-empty texts that fit one window). The CPU's name and features are
printed with the table and recorded.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import report_header, window_documents, write_documents, write_report
from nerbatch.cpu import describe_cpu

_MAIN = "from nerbatch.cli import main; sys.argv[0] = 'nerbatch'; main()"
VARIANTS = {
    "plain torch": ["-m", "nerbatch"],
    "transformers": ["-c", "import sys, nerbatch.modeling as m; m._load_plain = lambda *a: None; " + _MAIN],
    "default collector": ["-c", "import sys; " + _MAIN],
}


def run_once(variant: str, model_dir: str, source: Path, out: Path, precision: str) -> dict:
    """One whole `nerbatch annotate` process of `variant`: its wall time, start-up and precision."""
    cmd = [sys.executable, *VARIANTS[variant], "annotate", model_dir, str(source), "--output", str(out)]
    cmd += ["--id-column", "doc_id", "--precision", precision, "--overwrite", "--no-progress"]
    launched, started = time.time(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise click.ClickException(f"{variant} failed:\n{done.stderr[-2000:]}")
    rank = json.loads(next((out / "_nerbatch" / "stats").glob("rank-*.json")).read_text())
    stats = json.loads((out / "_nerbatch" / "stats.json").read_text())
    return {
        "wall": wall,
        "start_up": rank["work_started_at"] - launched,
        "in_job": stats["seconds"],
        "precision": stats["options"]["precision"],
    }


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--docs", default=50, show_default=True)
@click.option("--precision", "precisions", default="auto", show_default=True, help="Comma-separated.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Which of the variants to run.")
@click.option("--rounds", default=7, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(
    model_dir: str, corpus: Path, docs: int, precisions: str, variants: str, rounds: int, json_out: Path | None
) -> None:
    texts, _ = window_documents(model_dir, corpus, docs)
    names = [(v, p) for p in precisions.split(",") for v in variants.split(",")]
    runs: dict[tuple[str, str], list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        source = write_documents(texts, Path(tmp) / "docs.parquet")
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]  # each goes first in turn
            for variant, precision in order:
                out = Path(tmp) / f"{variant}-{precision}".replace(" ", "-")
                runs[variant, precision].append(run_once(variant, model_dir, source, out, precision))
    rows = {}
    for (variant, precision), records in runs.items():
        rows[f"{variant}, {precision}"] = {
            "precision": records[0]["precision"],
            **{f"{key}_seconds": statistics.median(r[key] for r in records) for key in ("start_up", "wall", "in_job")},
            "start_up_each": [round(r["start_up"], 3) for r in records],
        }
    click.echo(f"{describe_cpu()}\n{len(texts)} documents, {rounds} rounds, medians:")
    click.echo(f"{'variant':<30}{'start-up':>10}{'wall':>9}{'in job':>9}  precision")
    for name, row in rows.items():
        click.echo(
            f"{name:<30}{row['start_up_seconds']:>9.2f}s{row['wall_seconds']:>8.2f}s"
            f"{row['in_job_seconds']:>8.2f}s  {row['precision']}"
        )
    report = {
        **report_header("startup"),
        "model": model_dir,
        "docs": len(texts),
        "rounds": rounds,
        "variants": rows,
    }
    write_report(report, json_out)


if __name__ == "__main__":
    main()
