"""Start-up as the garbage collector sees it, in fresh processes: import nerbatch's annotate stack,
load a model, then freeze, under three collector settings, interleaved rounds:

- `young` (0.3.2, `nerbatch.startup`): young collections on, full ones held back;
- `off+collect` (0.3.1): the collector off, one full collection before the freeze;
- `off`: the collector off, no collection (what 0.3.1 would have frozen without its collection).

For each: seconds from process start to a frozen model (mean and best), the collection's own
seconds, how many objects were frozen, and how many of them were garbage (found by unfreezing and
collecting afterwards).

    python -m benchmarks.gc_startup runs/minilm-sentence --rounds 6 \\
        --json-out benchmarks/results/gc-startup-settings-epyc.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import click

from benchmarks.common import machine

# Runs in the child process; prints one JSON line. The model load goes through nerbatch's own
# `startup.collection_paused` as in `annotate`; `startup.end` is replaced by the setting under test.
CHILD = """
import gc, json, sys, time
started = time.perf_counter()
setting, model = sys.argv[1], sys.argv[2]
thresholds = gc.get_threshold()
from nerbatch import startup  # a light module: nothing heavy is imported before the setting applies
if setting == "young":
    startup.begin()
else:
    gc.disable()
import nerbatch.job
from nerbatch import modeling
startup.end = lambda: None
modeling.load_token_classifier(model)
before = time.perf_counter()
if setting == "off+collect":
    gc.collect()
collect = time.perf_counter() - before
gc.freeze()
seconds = time.perf_counter() - started
frozen = gc.get_freeze_count()
gc.unfreeze()
gc.set_threshold(*thresholds)
gc.enable()
gc.set_debug(gc.DEBUG_SAVEALL)
garbage = gc.collect()
print(json.dumps({"seconds": seconds, "collect_seconds": collect, "frozen": frozen, "garbage": garbage}))
"""

SETTINGS = ("young", "off+collect", "off")


@click.command()
@click.argument("model_dir")
@click.option("--rounds", default=6, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir: str, rounds: int, json_out: Path | None) -> None:
    samples = {setting: [] for setting in SETTINGS}
    for _ in range(rounds):
        for setting in SETTINGS:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, setting, model_dir], check=True, capture_output=True, text=True
            )
            samples[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {"machine": machine(), "command": " ".join(sys.argv), "model": model_dir, "rounds": rounds}
    click.echo(f"machine: {report['machine']['cores']} cores, {report['machine']['cpu']}; {rounds} rounds")
    for setting, runs in samples.items():
        seconds = [r["seconds"] for r in runs]
        summary = {
            "mean_seconds": statistics.mean(seconds),
            "best_seconds": min(seconds),
            "collect_seconds": statistics.mean(r["collect_seconds"] for r in runs),
            "frozen_objects": runs[-1]["frozen"],
            "frozen_garbage": runs[-1]["garbage"],
        }
        report[setting] = summary | {"runs": runs}
        click.echo(
            f"  {setting:12s} to a frozen model: mean {summary['mean_seconds']:.2f} s, "
            f"best {summary['best_seconds']:.2f} s (collection {summary['collect_seconds']:.2f} s); "
            f"{summary['frozen_objects']} objects frozen, {summary['frozen_garbage']} of them garbage"
        )
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        click.echo(f"written: {json_out}")


if __name__ == "__main__":
    main()
