"""The benchmark script runs its comparisons for real (tiny model, few documents), as a process."""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO, REUTERS, SHARED_DATA, need
from helpers import environment


def test_bench_annotation_section_compares_like_with_like(tiny_model_dir, tmp_path):
    need(REUTERS)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench.py"),
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
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["annotation"]
    assert report["docs"] == 24 and report["tokens"] > 24
    assert report["docs_with_different_spans"] == 0  # annotate --aggregation simple == the pipeline
    assert set(report["pipeline_docs_per_s"]) == {"1", "4"}
    assert report["annotate_over_pipeline"] > 0 and report["annotate_over_ceiling"] > 0
    assert "annotate / pipeline best" in done.stdout


def test_benchmarks_are_not_part_of_the_library():
    assert importlib.util.find_spec("nerbatch.bench") is None
    done = subprocess.run(
        [sys.executable, "-m", "nerbatch", "--help"], env=environment(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "bench" not in done.stdout.split("Commands:")[1]
