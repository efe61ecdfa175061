"""Peak memory of training steps on long inputs, whole batches against `micro_batch_tokens` slices.

Each case is a process of its own: the model, AdamW, then three optimizer steps on one batch of
ROWS x LENGTH subwords through `nerbatch.train.forward_backward`; its peak RSS (ru_maxrss) and the
median step time are printed and recorded.

    python -m benchmarks.train_memory MODEL_DIR --shape 32x256 --shape 32x64 --micro-batch-tokens 0,4096,2048 \
        --json-out benchmarks/results/train-memory-KIND.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from benchmarks.common import report_header, write_report
from nerbatch.cpu import describe_cpu

STEP = """
import json, resource, statistics, sys, time, torch
from nerbatch.modeling import load_model
from nerbatch.train import forward_backward

class OneProcess:
    def backward(self, loss):
        loss.backward()
    def no_sync(self, model):
        import contextlib
        return contextlib.nullcontext()

model_dir, rows, length, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
model, labels = load_model(model_dir, labels)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
generator = torch.Generator().manual_seed(0)
ids = torch.randint(1000, 20000, (rows, length), generator=generator)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "labels": torch.randint(0, len(labels), (rows, length), generator=generator)}
seconds = []
for _ in range(3):
    started = time.perf_counter()
    forward_backward(OneProcess(), model, batch, tokens)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - started)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_seconds": statistics.median(seconds)}))
"""


@click.command()
@click.argument("model_dir")
@click.option("--shape", "shapes", multiple=True, default=["32x256"], show_default=True, help="ROWSxLENGTH.")
@click.option("--micro-batch-tokens", "tokens", default="0,4096", show_default=True, help="Comma-separated; 0: whole.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir: str, shapes: tuple[str, ...], tokens: str, json_out: Path | None) -> None:
    rows = []
    click.echo(f"{describe_cpu()}\n{'batch':<10}{'slices of':>12}{'peak RSS':>12}{'step':>9}")
    for shape in shapes:
        count, length = (int(x) for x in shape.lower().split("x"))
        for limit in (int(t) for t in tokens.split(",")):
            cmd = [sys.executable, "-c", STEP, model_dir, str(count), str(length), str(limit)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"rows": count, "length": length, "micro_batch_tokens": limit, **result})
            sliced = f"{limit} tok" if limit and count * length > limit else "whole"
            click.echo(f"{shape:<10}{sliced:>12}{result['peak_rss_mib']:>8.0f} MiB{result['step_seconds']:>8.2f}s")
    report = {
        **report_header("train_memory"),
        "model": model_dir,
        "steps": rows,
    }
    write_report(report, json_out)


if __name__ == "__main__":
    main()
