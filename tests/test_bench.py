"""The benchmark command runs its comparisons for real (tiny model, few documents)."""

import json

from click.testing import CliRunner

from conftest import REUTERS, SHARED_DATA, need
from nerbatch.cli import main


def test_bench_annotation_section_compares_like_with_like(tiny_model_dir, tmp_path):
    need(REUTERS)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_model_dir), "--data", str(SHARED_DATA),
                                       "--sections", "annotation", "--docs", "24", "--batch-sizes", "1,4",
                                       "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["annotation"]
    assert report["docs"] == 24 and report["tokens"] > 24
    assert report["docs_with_different_spans"] == 0  # annotate --aggregation simple == the pipeline
    assert set(report["pipeline_docs_per_s"]) == {"1", "4"}
    assert report["annotate_over_pipeline"] > 0 and report["annotate_over_ceiling"] > 0
    assert "annotate / pipeline best" in result.output
