"""The two engines side by side, as whole processes on one machine, in one run:

- overhead: `--engine ray` with one actor holding every core vs the plain process, on the first
  DOCS Reuters articles (whole documents, as they come) in units of 100 rows; the in-job time (the
  units' own seconds, from stats.json) and the whole process, so Ray's start-up shows apart;
- stragglers: 40 units, two workers with one core each, worker 1 at half speed (the test hook
  `NERBATCH_TEST_SLOW_WORKER` sleeps after each chunk as long as a chunk takes at full speed):
  two torchrun ranks (fixed shares) vs two Ray actors (units on demand), wall time to the end;
- memory: the Ray driver's and the actor's peak RSS on the corpus and on ten copies of it.

    python -m benchmarks.engines runs/demo/model ../shared/data/reuters21578/reuters21578.parquet \
        --json-out benchmarks/results/engines-epyc.json

Rounds are interleaved (A B A B ...) and each figure is the median of its rounds.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import RSS_WRAPPER, machine
from nerbatch import __version__
from nerbatch.dist import launch_command
from nerbatch.job import SLOW_WORKER_ENV


def annotate(model_dir: str, source: Path, out: Path, *extra: str) -> list[str]:
    """The `nerbatch annotate` arguments (after the interpreter or launcher) of one run."""
    return ["-m", "nerbatch", "annotate", model_dir, str(source), "--output", str(out), "--id-column", "doc_id"] + [
        "--overwrite",
        "--no-progress",
        *extra,
    ]


def timed(cmd: list[str], env: dict | None = None) -> float:
    """Wall seconds of a whole process; it must succeed."""
    import os

    started = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def in_job_seconds(out: Path) -> float:
    return json.loads((out / "_nerbatch" / "stats.json").read_text())["seconds"]


def worker_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_nerbatch" / "stats").glob("*.json"))]


def write_corpus(corpus: Path, docs: int, rows_per_unit: int, path: Path, copies: int = 1) -> Path:
    """The first `docs` Reuters rows as `copies` files with `rows_per_unit` rows to a row group."""
    import pyarrow.parquet as pq

    table = pq.read_table(corpus, columns=["doc_id", "text"]).slice(0, docs)
    path.mkdir(parents=True)
    for copy in range(copies):
        pq.write_table(table, path / f"part-{copy}.parquet", row_group_size=rows_per_unit)
    return path


def median_rounds(methods: dict, rounds: int) -> dict:
    """Run every method once per round, interleaved; each method's results in round order."""
    results = {name: [] for name in methods}
    for _ in range(rounds):
        for name, run in methods.items():
            results[name].append(run())
    return results


def run_overhead(model_dir: str, corpus: Path, docs: int, rounds: int, tmp: Path) -> dict:
    source = write_corpus(corpus, docs, 100, tmp / "overhead")
    ray = ["--engine", "ray", "--actors", "1", "--cpus-per-actor", "2"]

    def method(name: str, extra: list[str]):
        out = tmp / f"overhead-{name}"

        def run() -> dict:
            whole = timed([sys.executable, *annotate(model_dir, source, out, *extra)])
            return {"whole": whole, "in_job": in_job_seconds(out)}

        return run

    results = median_rounds({"plain": method("plain", []), "ray": method("ray", ray)}, rounds)
    median = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("whole", "in_job")}
        for name, runs in results.items()
    }
    startup = {name: m["whole"] - m["in_job"] for name, m in median.items()}
    return {
        "docs": docs,
        "units": -(-docs // 100),
        "rounds": results,
        "median_seconds": median,
        "in_job_ray_over_plain": median["ray"]["in_job"] / median["plain"]["in_job"],
        "start_up_and_exit_seconds": startup,
        "ray_start_up_extra_seconds": startup["ray"] - startup["plain"],
    }


def run_stragglers(model_dir: str, corpus: Path, rows_per_unit: int, rounds: int, tmp: Path) -> dict:
    source = write_corpus(corpus, 40 * rows_per_unit, rows_per_unit, tmp / "stragglers")
    # A chunk at full speed with one thread: the slowed worker sleeps as long again after each one.
    calibrate = tmp / "stragglers-calibrate"
    timed([sys.executable, *annotate(model_dir, source, calibrate)], {"OMP_NUM_THREADS": "1"})
    chunk = in_job_seconds(calibrate) / 40  # one chunk per unit: a unit's rows fit one read
    slow = {SLOW_WORKER_ENV: f"1:{chunk:.3f}"}

    def ranks() -> float:
        return timed([*launch_command(2), *annotate(model_dir, source, tmp / "stragglers-ranks")], slow)

    def ray() -> float:
        extra = ["--engine", "ray", "--actors", "2", "--cpus-per-actor", "1"]
        return timed([sys.executable, *annotate(model_dir, source, tmp / "stragglers-ray", *extra)], slow)

    results = median_rounds({"ranks": ranks, "ray": ray}, rounds)
    median = {name: statistics.median(values) for name, values in results.items()}
    units = {name: [w.get("units") for w in worker_stats(tmp / f"stragglers-{name}")] for name in ("ranks", "ray")}
    return {
        "units": 40,
        "rows_per_unit": rows_per_unit,
        "slow_worker_sleep_per_chunk_s": chunk,
        "rounds_seconds": results,
        "median_seconds": median,
        "ray_sooner_by": median["ranks"] / median["ray"],
        "units_per_worker_last_round": units,
    }


def run_memory(model_dir: str, corpus: Path, docs: int, tmp: Path) -> dict:
    report = {"docs": docs}
    for name, copies in (("1x", 1), ("10x", 10)):
        source = write_corpus(corpus, docs, 100, tmp / f"memory-{name}", copies)
        out = tmp / f"memory-out-{name}"
        extra = ["--engine", "ray", "--actors", "1", "--cpus-per-actor", "2"]
        done = subprocess.run(
            [sys.executable, "-c", RSS_WRAPPER, sys.executable, *annotate(model_dir, source, out, *extra)],
            check=True,
            capture_output=True,
            text=True,
        )
        [actor] = worker_stats(out)
        report[name] = {
            "rows": actor["rows"],
            # the largest process the driver waited for: itself, or Ray's GCS/raylet it started
            "driver_peak_rss_mb": int(done.stdout.split("MAXRSS_KB")[-1]) / 1024,
            "actor_peak_rss_mb": actor["peak_rss_mb"],
        }
    for role in ("driver", "actor"):
        report[f"{role}_10x_over_1x"] = report["10x"][f"{role}_peak_rss_mb"] / report["1x"][f"{role}_peak_rss_mb"]
    return report


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


@click.command()
@click.argument("model_dir")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--docs", default=2000, show_default=True, help="Documents of the overhead comparison.")
@click.option("--straggler-rows", default=25, show_default=True, help="Rows in each of the 40 straggler units.")
@click.option("--memory-docs", default=500, show_default=True, help="Documents of the 1x memory run.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--sections", default="overhead,stragglers,memory", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(model_dir, corpus, docs, straggler_rows, memory_docs, rounds, sections, json_out) -> None:
    """Ray vs the plain process and torchrun ranks: overhead, stragglers, memory."""
    wanted = sections.split(",")
    recorded = {
        "nerbatch": __version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
    }
    report = {"recorded": recorded, "command": " ".join(["python -m benchmarks.engines", *sys.argv[1:]])}
    report["model"] = model_dir
    m = recorded["machine"]
    click.echo(f"machine: {m['cores']} cores, {m['cpu']}; torch {m['torch']}; model {model_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        if "overhead" in wanted:
            o = report["overhead"] = run_overhead(model_dir, corpus, docs, rounds, Path(tmp))
            s = o["median_seconds"]
            click.echo(
                f"overhead, {o['docs']} docs: in the job plain {s['plain']['in_job']:.1f} s, "
                f"ray {s['ray']['in_job']:.1f} s ({o['in_job_ray_over_plain']:.3f}x); "
                f"whole process plain {s['plain']['whole']:.1f} s, ray "
                f"{s['ray']['whole']:.1f} s (Ray start-up and exit {o['ray_start_up_extra_seconds']:+.1f} s)"
            )
        if "stragglers" in wanted:
            st = report["stragglers"] = run_stragglers(model_dir, corpus, straggler_rows, rounds, Path(tmp))
            s = st["median_seconds"]
            click.echo(
                f"stragglers, 40 units, worker 1 at half speed: ranks {s['ranks']:.1f} s, ray {s['ray']:.1f} s "
                f"(ray {st['ray_sooner_by']:.2f}x sooner); units per worker {st['units_per_worker_last_round']}"
            )
        if "memory" in wanted:
            mem = report["memory"] = run_memory(model_dir, corpus, memory_docs, Path(tmp))
            click.echo(
                f"memory, ray: driver {mem['1x']['driver_peak_rss_mb']:.0f} -> {mem['10x']['driver_peak_rss_mb']:.0f}"
                f" MiB ({mem['driver_10x_over_1x']:.2f}x), actor {mem['1x']['actor_peak_rss_mb']:.0f} -> "
                f"{mem['10x']['actor_peak_rss_mb']:.0f} MiB ({mem['actor_10x_over_1x']:.2f}x) for 10x the corpus"
            )
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        click.echo(f"written: {json_out}")


if __name__ == "__main__":
    main()
