"""The benchmark script runs its comparisons for real (tiny model, few documents), as a process."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, REUTERS, SHARED_DATA, need
from helpers import environment

# whole benchmark scripts as processes, on the shared data
pytestmark = pytest.mark.slow


def test_bench_annotation_section_compares_like_with_like(tiny_model_dir, tmp_path):
    need(REUTERS)
    out = tmp_path / "bench.json"
    done = run_benchmark(
        "bench",
        *[
            "--model",
            str(tiny_model_dir),
            "--data",
            str(SHARED_DATA),
            "--sections",
            "annotation",
            "--docs",
            "24",
            "--batch-sizes",
            "1,4",
            "--json-out",
            str(out),
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["annotation"]
    assert report["docs"] == 24 and report["tokens"] > 24
    assert report["docs_with_different_spans"] == 0  # annotate --aggregation simple == the pipeline
    assert set(report["pipeline_docs_per_s"]) == {"1", "4"}
    assert report["annotate_over_pipeline"] > 0 and report["annotate_over_ceiling"] > 0
    assert "annotate / pipeline best" in done.stdout


def test_bench_processes_section_times_whole_processes(tiny_model_dir, tmp_path):
    need(REUTERS)
    out = tmp_path / "bench.json"
    args = ["--model", str(tiny_model_dir), "--data", str(SHARED_DATA), "--sections", "processes"]
    args += ["--process-docs", "12", "--batch-sizes", "1,4", "--repeats", "1", "--json-out", str(out)]
    done = run_benchmark("bench", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["processes"]
    assert report["docs"] == 12 and set(report["seconds"]) == {
        "pipeline batch 1",
        "pipeline batch 4",
        "annotate fp32",
        "annotate int8",
    }
    for name in ("annotate fp32", "annotate int8"):  # the job's own time is part of the whole process
        assert 0 < report["in_job_seconds"][name] < report["seconds"][name]
    assert report["pipeline_best"] in ("pipeline batch 1", "pipeline batch 4")
    assert report["int8_over_fp32"] == report["seconds"]["annotate fp32"] / report["seconds"]["annotate int8"]
    assert "int8 / fp32 annotate" in done.stdout and json.loads(out.read_text())["machine"]["cpu"]


def test_benchmarks_are_not_part_of_the_library():
    assert importlib.util.find_spec("nerbatch.bench") is None
    done = subprocess.run(
        [sys.executable, "-m", "nerbatch", "--help"], env=environment(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "bench" not in done.stdout.split("Commands:")[1]


def test_output_layout_benchmark_runs_its_checks(tiny_model_dir, tmp_path):
    """The layout script at small sizes: same DuckDB counts in both layouts, kill + rerun equality."""
    need(REUTERS)
    out = tmp_path / "layout.json"
    done = run_benchmark(
        "output_layout",
        *[
            "--model",
            str(tiny_model_dir),
            "--data",
            str(SHARED_DATA),
            "--scan-rows",
            "3000",
            "--run-rows",
            "300",
            "--group-rows",
            "20",
            "--repeats",
            "1",
            "--json-out",
            str(out),
        ],
        NERBATCH_TEST_SLOW_BATCH_S="0.05",  # so the kill lands mid-run
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    scan, run = report["scan"], report["run"]
    assert scan["same_counts"] and scan["0.2 layout"]["files"] == 3 and scan["assembled"]["files"] == 1
    assert scan["0.2 layout"]["row_groups"] == 6 and scan["assembled"]["row_groups"] == 1
    assert run["input_row_groups"] == 15 and run["files"] == 1 and run["old_layout_files"] == 15
    assert 5 <= run["units_done_when_killed"] < 15
    assert run["killed_and_rerun_equals_uninterrupted"] and run["old_layout_equals"]
    assert run["kept_types_equal_input"] and run["peak_rss_mb"]["assembled"] > 0


def run_benchmark(module: str, *args, **env: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.MODULE` with `args` as a process from the repository root, offline; its
    output captured."""
    command = [sys.executable, "-m", f"benchmarks.{module}", *map(str, args)]
    return subprocess.run(command, env=environment(**env), cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cpu_side_times_two_source_trees_with_a_model_without_layers(tiny_model_dir, tmp_path):
    """benchmarks/cpu_side.py: whole annotate processes with a no-layer model, this tree against
    another (here the same one, under another path), units after the first counted as steady."""
    import shutil

    need(REUTERS)
    other = tmp_path / "other"
    shutil.copytree(REPO / "nerbatch", other / "nerbatch")
    out = tmp_path / "side.json"
    done = run_benchmark(
        "cpu_side", "--model", tiny_model_dir, "--reuters", REUTERS, "--docs", 40, "--copies", 2,
        "--rounds", 1, "--other", other, "--json-out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["best"]) == {"this", "other"} and report["variants"]["other"][0] == str(other)
    for figures in report["best"].values():
        assert figures["docs"] == 80 and figures["work_docs_per_s"] > 0 and figures["process_seconds"] > 0
        assert figures["steady_docs_per_s"] > 0


def test_cpu_lanes_times_lanes_against_batches_in_turn(tiny_model_dir, tmp_path):
    """benchmarks/cpu_lanes.py: whole annotate processes, each precision with and without lanes."""
    need(REUTERS)
    out = tmp_path / "lanes.json"
    done = run_benchmark(
        "cpu_lanes", tiny_model_dir, REUTERS, "--docs", 30, "--precisions", "fp32", "--rounds", 1, "--json-out", out
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [(precision, row)] = json.loads(out.read_text())["precisions"].items()
    assert precision == "fp32" and len(row["seconds"]["lanes"]) == len(row["seconds"]["in turn"]) == 1
    assert row["lanes_seconds"] > row["lanes_in_job_seconds"] > 0 and row["lanes_faster_by"] > 0
