"""CPU lanes, as users run them: whole `nerbatch annotate` processes with the model in one lane per
core (the default) against the batches run in turn over all cores (`NERBATCH_CPU_LANES=1`), at each
precision asked for, interleaved, on this CPU (named with its features above the table).

    python -m benchmarks.cpu_lanes MODEL_DIR ../shared/data/reuters21578/reuters21578.parquet \
        --docs 4000 --precisions int8,bf16,fp32 --rounds 5 --json-out benchmarks/results/cpu-lanes-KIND.json

Each round runs every command once, in an order rotated from round to round; a figure is the median
over rounds, and the gain the median of the paired ratio (batches in turn / lanes, same round).
annotate runs with default options except `--aggregation simple`, on the documents of
`benchmarks.cpu_precision` (Reuters texts that fit one window).
"""

from __future__ import annotations

import datetime
import statistics
import tempfile
from pathlib import Path

import click

from benchmarks.common import report_header, window_documents, write_documents, write_report
from benchmarks.cpu_precision import annotate_command, time_rounds
from benchmarks.engines import commit
from nerbatch import __version__
from nerbatch.cpu import describe_cpu
from nerbatch.inference import LANES_ENV


def commands(model_dir: str, source: Path, tmp: Path, precisions: list[str]) -> dict[str, list[str]]:
    """Per precision: annotate with its lanes, and with the batches in turn (no lanes)."""
    found = {}
    for precision in precisions:
        found[f"{precision} lanes"] = annotate_command(model_dir, source, tmp / f"{precision}-lanes", precision)
        in_turn = annotate_command(model_dir, source, tmp / f"{precision}-in-turn", precision)
        found[f"{precision} in turn"] = ["env", f"{LANES_ENV}=1", *in_turn]
    return found


def summarize(runs: dict[str, list[dict]], precisions: list[str]) -> dict:
    """Per precision: median wall and in-job seconds of both ways, and the median paired gain."""
    summary = {}
    for precision in precisions:
        lanes, in_turn = runs[f"{precision} lanes"], runs[f"{precision} in turn"]
        summary[precision] = {
            "lanes_seconds": statistics.median(r["wall"] for r in lanes),
            "in_turn_seconds": statistics.median(r["wall"] for r in in_turn),
            "lanes_in_job_seconds": statistics.median(r["in_job"] for r in lanes),
            "in_turn_in_job_seconds": statistics.median(r["in_job"] for r in in_turn),
            "lanes_faster_by": statistics.median(b["wall"] / a["wall"] for a, b in zip(lanes, in_turn)),
            "seconds": {"lanes": [r["wall"] for r in lanes], "in turn": [r["wall"] for r in in_turn]},
        }
    return summary


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--docs", default=4000, show_default=True, help="Documents per run.")
@click.option("--precisions", default="int8,bf16,fp32", show_default=True, help="Comma-separated.")
@click.option("--rounds", default=5, show_default=True, help="Each command runs once per round.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir, corpus, docs, precisions, rounds, json_out) -> None:
    """Lanes against batches in turn, whole annotate processes, interleaved."""
    chosen = [p.strip() for p in precisions.split(",") if p.strip()]
    click.echo(describe_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        texts, _ = window_documents(model_dir, corpus, docs)
        source = write_documents(texts, Path(tmp) / "docs.parquet")
        summary = summarize(time_rounds(commands(model_dir, source, Path(tmp), chosen), rounds), chosen)
    click.echo(f"\n{describe_cpu()}\n{docs} documents, whole processes, medians of {rounds} rounds:")
    click.echo(f"{'precision':<10}{'lanes':>10}{'in turn':>10}{'lanes faster by':>17}")
    for precision, row in summary.items():
        click.echo(
            f"{precision:<10}{row['lanes_seconds']:>9.1f}s{row['in_turn_seconds']:>9.1f}s{row['lanes_faster_by']:>16.2f}x"
        )
    report = {
        "recorded": {"nerbatch": __version__, "date": datetime.date.today().isoformat(), "commit": commit()},
        **report_header("cpu_lanes"),
        "model": model_dir,
        "docs": docs,
        "rounds": rounds,
        "precisions": summary,
    }
    write_report(report, json_out)


if __name__ == "__main__":
    main()
