"""The job a user writes without nerbatch: the transformers pipeline over a Parquet file, spans to Parquet.

    python -m benchmarks.pipeline_job MODEL_DIR INPUT.parquet OUTPUT.parquet --batch-size 8

The benchmark times it as a whole process against `nerbatch annotate` (see bench.py, section
`processes`). It reads the whole text column and keeps every result in memory, as such scripts do.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--text-column", default="text")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import pipeline

    texts = pq.read_table(args.input, columns=[args.text_column]).column(0).to_pylist()
    ner = pipeline(
        "token-classification",
        model=args.model,
        aggregation_strategy="simple",
        device=0 if torch.cuda.is_available() else -1,
    )
    results = ner(texts, batch_size=args.batch_size)
    entities = [
        [{"start": e["start"], "end": e["end"], "label": e["entity_group"], "score": float(e["score"])} for e in found]
        for found in results
    ]
    pq.write_table(pa.table({"entities": entities}), args.output)


if __name__ == "__main__":
    main()
