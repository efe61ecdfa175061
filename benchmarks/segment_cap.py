"""The sentence view's segment cap, measured: document-level F1 on labelled documents rebuilt with
their sentences joined by newlines or by spaces, at each cap (`--max-segment`), with annotate's own
code path (`nerbatch.evaluation.evaluate_documents`), in one process.

    python -m benchmarks.segment_cap MODEL_DIR ../shared/data/conll2003/valid.txt \
        --caps none,54,64,96,128,162 --joins space,newline --json-out benchmarks/results/segment-cap-epyc.json

`none` is no cap. One line is printed per join and cap as it completes.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import click

from benchmarks.common import machine
from benchmarks.engines import commit
from nerbatch import __version__


@click.command()
@click.argument("model_dir")
@click.argument("data")
@click.option("--caps", default="none,54,96,162", show_default=True, help="Caps in subwords; none: no cap.")
@click.option("--joins", default="space,newline", show_default=True)
@click.option("--threads", default=0, help="torch threads (0: torch's default).")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir, data, caps, joins, threads, json_out) -> None:
    """Document-level F1 at each segment cap, for each join."""
    import torch

    from nerbatch.data import read_conll
    from nerbatch.documents import build_documents
    from nerbatch.evaluation import evaluate_documents
    from nerbatch.inference import Tagger
    from nerbatch.modeling import load_token_classifier

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_token_classifier(model_dir)
    corpus = read_conll(data)
    results = []
    for join in joins.split(","):
        documents = build_documents(corpus, join)
        for cap in [None if c == "none" else int(c) for c in caps.split(",")]:
            started = time.time()
            metrics = evaluate_documents(Tagger(model, tokenizer, max_segment=cap or 0), corpus, documents, 0, 1)
            results.append({"join": join, "cap": cap, "f1": metrics["overall_f1"], "seconds": time.time() - started})
            click.echo(f"{join:8s} cap {cap}: {metrics['overall_f1']:.4f} ({time.time() - started:.0f} s)")
    if json_out:
        recorded = {"nerbatch": __version__, "date": datetime.date.today().isoformat(), "commit": commit()}
        report = {"recorded": {**recorded, "machine": machine()}, "model": model_dir, "data": data, "results": results}
        report["command"] = " ".join(["python -m benchmarks.segment_cap", *sys.argv[1:]])
        json_out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
