"""The model's forward pass alone on CPU, under each way of running a precision: fp32, bf16 under
autocast, bf16 with the Linear weights cast, the whole model cast to bf16 (what annotate runs), and
int8 through each quantized engine (fbgemm is what annotate runs). Length-sorted batches of Reuters
windows of at most 128 subwords and 1,024 padded subwords, as annotate's CPU defaults batch them;
interleaved rounds, medians.

    python -m benchmarks.cpu_kernels MODEL_DIR ../shared/data/reuters21578/reuters21578.parquet \
        --rounds 3 --json-out benchmarks/results/cpu-kernels-epyc-zen4.json
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import click

from benchmarks.common import machine
from benchmarks.engines import commit
from nerbatch import __version__
from nerbatch.cpu import describe_cpu


def batches(tokenizer, corpus: Path, docs: int = 400, count: int = 60):
    """`count` padded batches (ids, mask) of the first `docs` Reuters texts, longest first."""
    import pyarrow.parquet as pq
    import torch

    texts = [t for t in pq.read_table(corpus, columns=["text"]).column(0).to_pylist()[:docs] if t]
    ids = sorted(tokenizer(texts, truncation=True, max_length=128)["input_ids"], key=len, reverse=True)
    groups, current = [], []
    for row in ids:
        if current and (len(current) + 1) * len(current[0]) > 1024:
            groups.append(current)
            current = []
        current.append(row)
    groups.append(current)
    out = []
    for group in groups[:count]:
        width = max(map(len, group))
        tensor, mask = (
            torch.zeros(len(group), width, dtype=torch.long),
            torch.zeros(len(group), width, dtype=torch.long),
        )
        for i, row in enumerate(group):
            tensor[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        out.append((tensor, mask))
    return out


def variants(model, tokenizer) -> dict:
    """name -> (model, autocast dtype or None, quantized engine or None)."""
    import torch

    from nerbatch.precision import cast_bf16, quantize_int8

    found = {"fp32": (model, None, None), "bf16 autocast": (model, torch.bfloat16, None)}
    linear_bf16 = copy.deepcopy(model)
    for module in linear_bf16.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    found["bf16 Linear weights + autocast"] = (linear_bf16, torch.bfloat16, None)
    found["bf16 cast once (annotate)"] = (cast_bf16(model), None, None)
    for engine in ("fbgemm", "onednn"):
        torch.backends.quantized.engine = engine
        found[f"int8 {engine}" + (" (annotate)" if engine == "fbgemm" else "")] = (
            quantize_int8(model, tokenizer),
            None,
            engine,
        )
    return found


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rounds", default=3, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir, corpus, rounds, json_out) -> None:
    """Forward-pass seconds of each variant, and each one's speed over fp32."""
    import torch

    from nerbatch.modeling import load_token_classifier

    warnings.simplefilter("ignore")
    model, tokenizer = load_token_classifier(model_dir)
    data = batches(tokenizer, corpus)
    found = variants(model.eval(), tokenizer)

    @torch.inference_mode()
    def run(name: str) -> float:
        net, dtype, engine = found[name]
        if engine:
            torch.backends.quantized.engine = engine
        started = time.perf_counter()
        for ids, mask in data:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                net(input_ids=ids, attention_mask=mask)
        return time.perf_counter() - started

    for name in found:  # warm-up
        run(name)
    seconds = {name: [] for name in found}
    for _ in range(rounds):
        for name in found:
            seconds[name].append(run(name))
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    click.echo(describe_cpu())
    for name, value in medians.items():
        click.echo(f"{name:34s} {value:7.3f} s  {medians['fp32'] / value:5.2f}x fp32")
    if json_out:
        recorded = {"nerbatch": __version__, "date": datetime.date.today().isoformat(), "commit": commit()}
        report = {"recorded": {**recorded, "machine": machine()}, "cpu": describe_cpu(), "model": model_dir}
        report |= {"batches": len(data), "rounds": rounds, "seconds": seconds, "median_seconds": medians}
        report["over_fp32"] = {name: medians["fp32"] / value for name, value in medians.items()}
        report["command"] = " ".join(["python -m benchmarks.cpu_kernels", *sys.argv[1:]])
        json_out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
