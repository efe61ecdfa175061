"""`nerbatch stats` on real annotate outputs: the summary against the Parquet files, bookkeeping states
(complete, missing, failed), pieces awaiting assembly, refusals."""

from __future__ import annotations

import json
import random
import shutil
import string
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.cli import main
from nerbatch.rundir import ReportError
from nerbatch.show import sample_documents
from nerbatch.stats import collect_stats, format_stats

from helpers import annotate_in_process, output_rows


def test_stats_equal_the_counts_of_the_output_files(plain_out):
    stats = collect_stats(plain_out)
    rows = output_rows(plain_out)
    assert stats["complete"] and stats["units"] == {"total": 3, "done": 3, "failed": 0, "missing": 0}
    assert stats["failed_units"] == stats["missing_units"] == []
    assert stats["rows"] == stats["input_rows"] == len(rows) == 30 and stats["files"] == 3
    reasons = Counter(r["error"] for r in rows if r["error"] is not None)
    assert stats["flagged_by_reason"] == reasons == {"null text": 1, "whitespace-only text": 2, "empty text": 1}
    assert stats["flagged"] == 4
    labels = Counter(e["label"] for r in rows for e in r["entities"])
    assert stats["entities_by_label"] == labels and stats["entities"] == labels.total() > 0
    assert stats["documents_with_entities"] == sum(bool(r["entities"]) for r in rows)
    [rank] = stats["ranks"]
    assert (rank["rank"], rank["world"], rank["units"], rank["rows"]) == (0, 1, 3, 30) and rank["failed"] == 0
    assert rank["docs_per_second"] == pytest.approx(30 / rank["wall_seconds"]) and rank["tokens_per_second"] > 0
    assert 50 < rank["peak_rss_mb"] < 8192  # this process's peak, in MiB (the test runs in-process)
    assert json.loads(json.dumps(stats)) == stats


def test_format_stats_is_an_aligned_report(plain_out):
    stats = collect_stats(plain_out)
    report = format_stats(stats)
    assert "complete: 3 of 3 units done" in report and "30 in 3 output files" in report
    labels = stats["entities_by_label"]
    lines = {line.split()[0]: line for line in report.splitlines() if line.split()[0] in labels}
    assert {label: line.split()[1:] for label, line in lines.items()} == {k: [f"{n:,}"] for k, n in labels.items()}
    assert len({len(line) for line in lines.values()}) == 1  # counts right-aligned in one column
    assert f"{stats['ranks'][0]['peak_rss_mb']:,.0f} MiB" in report.split("throughput")[1]
    assert any(line.split()[:2] == ["null", "text"] and line.split()[-1] == "1" for line in report.splitlines())


def test_parts_are_found_in_hive_style_subdirectories(plain_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    for i, part in enumerate(sorted(out.glob("part-*.parquet"))):
        (out / f"lang={'en' if i else 'de'}").mkdir(exist_ok=True)
        part.rename(out / f"lang={'en' if i else 'de'}" / part.name)
    for ignored in [out / "_nerbatch" / "tmp" / "half.parquet", out / ".cache" / "x.parquet"]:
        ignored.parent.mkdir(parents=True, exist_ok=True)
        ignored.write_bytes(b"not parquet")  # would fail the reading if it were not skipped
    moved, original = collect_stats(out), collect_stats(plain_out)
    assert {**moved, "out_dir": None} == {**original, "out_dir": None}
    assert [d["text"] for d in sample_documents(out, 5, 1)] == [d["text"] for d in sample_documents(plain_out, 5, 1)]


def test_a_run_with_unassembled_files_is_not_complete(plain_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    (out / "_nerbatch" / "stats.json").unlink()  # as after a crash before the last file was assembled
    stats = collect_stats(out)
    assert not stats["complete"] and stats["units"]["done"] == 3
    assert "every unit done, but not every output file assembled" in format_stats(stats)


def test_a_unit_without_its_done_marker_is_missing(plain_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    (out / "_nerbatch" / "done" / "unit-000001.json").unlink()
    stats = collect_stats(out)
    assert not stats["complete"] and stats["units"] == {"total": 3, "done": 2, "failed": 0, "missing": 1}
    [missing] = stats["missing_units"]
    assert missing["unit"] == "unit-000001" and missing["input"].endswith("a.parquet row group 1")
    report = format_stats(stats)
    assert "INCOMPLETE: 2 of 3 units done, 0 failed, 1 missing" in report and "unit-000001" in report


def test_a_failed_unit_is_reported_with_its_error(tiny_model_dir, tmp_path):
    """A real failure: the data pages of one input are garbage (its footer is fine)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(pa.table({"text": ["Talks in Paris .", "Rome"]}), inputs / "good.parquet")
    rng = random.Random(0)
    noise = ["".join(rng.choices(string.ascii_letters + " ", k=80)) for _ in range(400)]  # incompressible
    pq.write_table(pa.table({"text": noise}), inputs / "zcorrupt.parquet", compression="zstd")
    data = bytearray((inputs / "zcorrupt.parquet").read_bytes())
    data[100:2000] = bytes(1900)
    (inputs / "zcorrupt.parquet").write_bytes(bytes(data))
    out = tmp_path / "out"
    assert annotate_in_process(tiny_model_dir, inputs, "--output", out).exit_code != 0
    recorded = json.loads((out / "_nerbatch" / "failed" / "unit-000001.json").read_text())["error"]
    stats = collect_stats(out)
    assert not stats["complete"] and stats["units"] == {"total": 2, "done": 1, "failed": 1, "missing": 0}
    assert stats["failed_units"] == [
        {"unit": "unit-000001", "input": str((inputs / "zcorrupt.parquet").resolve()), "error": recorded}
    ]
    assert "zcorrupt.parquet" in recorded and stats["rows"] == 2  # the good unit's piece, awaiting assembly
    assert (stats["files"], stats["pieces"]) == (0, 1)
    assert stats["ranks"][0]["failed"] == 1
    report = format_stats(stats)
    assert "failed units" in report and " ".join(recorded.split()) in report


def test_a_directory_that_is_not_an_output_is_refused(tmp_path):
    (tmp_path / "part-000000.parquet").write_bytes(b"")
    for path in [tmp_path, tmp_path / "absent"]:
        for read in [collect_stats, lambda p: sample_documents(p, 3, 0)]:
            with pytest.raises(ReportError) as error:
                read(path)
            assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_stats_and_show_commands(plain_out, tmp_path):
    """The commands print what the functions compute: JSON stats, and one HTML page with the sample."""
    out_dir = plain_out
    result = CliRunner().invoke(main, ["stats", str(out_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps(collect_stats(out_dir)))
    page = tmp_path / "sample.html"
    result = CliRunner().invoke(main, ["show", str(out_dir), "--sample", "3", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert page.read_text(encoding="utf-8").count("<mark") == sum(
        len(d["entities"]) for d in sample_documents(out_dir, 3, 0)
    )
    result = CliRunner().invoke(main, ["stats", str(tmp_path)])
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output


def test_pieces_left_beside_their_assembled_file_are_not_counted_twice(plain_out, tmp_path):
    """A crash between recording a file and dropping its pieces leaves them; the file holds their rows."""
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    assert json.loads((out / "_nerbatch" / "files" / "part-00000.json").read_text())["units"] == [0]
    shutil.copy(out / "part-00000.parquet", out / "_nerbatch" / "pieces" / "unit-000000.parquet")
    stats = collect_stats(out)
    assert stats["rows"] == stats["input_rows"] == 30 and stats["pieces"] == 0 and stats["flagged"] == 4


def test_stats_names_a_foreign_parquet_file_in_the_output(plain_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    pq.write_table(pa.table({"x": [1]}), out / "zz-notes.parquet")
    result = CliRunner().invoke(main, ["stats", str(out)])
    assert result.exit_code == 1 and "zz-notes.parquet: no column 'error'" in result.output
