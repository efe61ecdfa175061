"""Start-up, measured as whole processes (start to exit) on one Parquet file:

- `nerbatch annotate` as shipped (the console entry point: full garbage collections held back until
  the model is loaded, then everything frozen; frozen again at exit);
- the same command through the CLI's `main`, with Python's default collector;

at each `--precision`, interleaved rounds, best round each, with the seconds inside the job (from
the run's stats.json) so that start-up and exit are the rest.

    python -m benchmarks.startup MODEL_DIR ../shared/data/reuters21578/reuters21578.parquet --docs 800 \
        --repeats 3 --json-out benchmarks/results/startup-epyc.json

The documents are bench.py's (the first DOCS non-empty texts that fit one window).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from benchmarks.common import best_times, machine, window_documents, write_documents

VARIANTS = {
    "shipped": ["-m", "nerbatch"],
    "default collector": ["-c", "import sys; from nerbatch.cli import main; sys.argv[0] = 'nerbatch'; main()"],
}


def runner(variant: str, model_dir: str, source: Path, out: Path, precision: str):
    """A whole `nerbatch annotate` process of `variant`; returns the seconds spent inside the job."""
    import subprocess

    cmd = [sys.executable, *VARIANTS[variant], "annotate", model_dir, str(source), "--output", str(out)]
    cmd += ["--id-column", "doc_id", "--precision", precision, "--overwrite", "--no-progress"]

    def run() -> float:
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads((out / "_nerbatch" / "stats.json").read_text())["seconds"]

    return run


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--docs", default=800, show_default=True)
@click.option("--precision", "precisions", default="fp32,int8", show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Which of the variants to run.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(
    model_dir: str, corpus: Path, docs: int, precisions: str, variants: str, repeats: int, json_out: Path | None
) -> None:
    texts, _ = window_documents(model_dir, corpus, docs)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_documents(texts, Path(tmp) / "docs.parquet")
        methods = {
            f"{variant}, {precision}": runner(
                variant, model_dir, source, Path(tmp) / f"{variant}-{precision}", precision
            )
            for precision in precisions.split(",")
            for variant in variants.split(",")
        }
        seconds, in_job = best_times(methods, repeats)
    report = {"machine": machine(), "command": " ".join(sys.argv), "model": model_dir, "docs": len(texts)}
    report["seconds"] = seconds
    report["in_job_seconds"] = in_job
    click.echo(f"machine: {report['machine']['cores']} cores, {report['machine']['cpu']}; {len(texts)} docs")
    for name, whole in seconds.items():
        inside = in_job[name]
        click.echo(f"  {name:28s} {whole:6.2f} s   ({inside:.2f} s in the job, {whole - inside:.2f} s start-up/exit)")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        click.echo(f"written: {json_out}")


if __name__ == "__main__":
    main()
