"""The annotate command in one process (click's CliRunner): output contract, refusals, bad input, resume."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch import __version__
from nerbatch.cli import main
from nerbatch.rundir import RunDir
from nerbatch.stats import collect_stats

from conftest import REUTERS, need
from helpers import good_and_corrupt_inputs

README_QUERY = (
    "SELECT e.label, count(*) AS n FROM (SELECT unnest(entities) AS e FROM read_parquet('{out}/*.parquet')) "
    "GROUP BY 1 ORDER BY n DESC"
)


def annotate(model: Path, *args) -> object:
    return CliRunner().invoke(main, ["annotate", str(model), *map(str, args), "--no-progress"], catch_exceptions=False)


def read_output(out: Path) -> pa.Table:
    parts = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in parts).sort_by(
        [("source_file", "ascending"), ("row_index", "ascending")]
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """160 Reuters rows (some with null text) plus hand-made bad rows, in two files, one with row groups."""
    table = pq.read_table(need(REUTERS), columns=["doc_id", "text"]).slice(0, 160)
    extra = pa.table(
        {
            "doc_id": pa.array([-1, -2, -3, -4], pa.int64()),
            "text": ["", "  \r\n\t ", "東京 São Paulo 👩‍👩‍👧 e\u0301", None],
        }
    )
    directory = tmp_path_factory.mktemp("corpus")
    pq.write_table(pa.concat_tables([table.slice(0, 100), extra]), directory / "a.parquet", row_group_size=40)
    pq.write_table(table.slice(100), directory / "b.parquet")
    return directory


@pytest.fixture(scope="module")
def annotated(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "annotated"
    result = annotate(tiny_model_dir, corpus, "--output", out, "--max-length", 48, "--read-rows", 16)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_every_input_row_appears_once_and_bad_rows_are_flagged(corpus, annotated):
    table = read_output(annotated)
    expected = [
        (str((corpus / name).resolve()), i) for name, n in [("a.parquet", 104), ("b.parquet", 60)] for i in range(n)
    ]
    assert list(zip(table["source_file"].to_pylist(), table["row_index"].to_pylist())) == expected
    texts = (
        pq.read_table(corpus / "a.parquet")["text"].to_pylist()
        + pq.read_table(corpus / "b.parquet")["text"].to_pylist()
    )
    errors = table["error"].to_pylist()
    for text, error, entities in zip(texts, errors, table["entities"].to_pylist()):
        if text is None:
            assert error == "null text" and entities == []
        elif not text.strip():
            assert error in ("empty text", "whitespace-only text") and entities == []
        else:
            assert error is None
            assert all(text[e["start"] : e["end"]] == e["text"] for e in entities)
    assert errors.count("null text") == sum(t is None for t in texts) >= 10
    assert errors[100:104] == ["empty text", "whitespace-only text", None, "null text"]
    windows = table["n_windows"].to_pylist()
    assert max(windows) > 1 and all((w == 0) == (e is not None) for w, e in zip(windows, errors))


@pytest.mark.slow
def test_output_schema_metadata_and_stats(tiny_model_dir, annotated):
    parts = sorted(annotated.glob("*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet"]  # 4 units (3 row groups + 1 file), one output file
    assert pq.ParquetFile(parts[0]).metadata.num_row_groups == 1  # 164 rows < --row-group-rows
    assert not list((annotated / "_nerbatch" / "pieces").iterdir())  # assembled pieces are dropped
    schema = pq.read_schema(parts[0])
    assert str(schema.field("entities").type) == (
        "list<element: struct<start: int32, end: int32, label: string, text: string, score: float>>"
    )
    meta = {k.decode(): json.loads(v) for k, v in schema.metadata.items() if k.startswith(b"nerbatch.")}
    assert meta["nerbatch.model"] == str(tiny_model_dir.resolve())
    assert meta["nerbatch.labels"][1] == "B-PER" and meta["nerbatch.version"] == __version__
    assert meta["nerbatch.options"]["aggregation"] == "first" and meta["nerbatch.options"]["max_length"] == 48
    assert pq.ParquetFile(parts[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    stats = json.loads((annotated / "_nerbatch" / "stats.json").read_text())
    table = read_output(annotated)
    assert stats["complete"] and stats["rows"] == 164 and stats["flagged"] == 164 - table["error"].null_count
    assert stats["entities"] == sum(len(e) for e in table["entities"].to_pylist()) > 0
    assert stats["tokens"] > 10000 and stats["seconds"] > 0


@pytest.mark.slow
def test_duckdb_reads_the_output_with_the_readme_query(annotated):
    rows = duckdb.sql(README_QUERY.format(out=annotated)).fetchall()
    table = read_output(annotated)
    counts: dict[str, int] = {}
    for entities in table["entities"].to_pylist():
        for e in entities:
            counts[e["label"]] = counts.get(e["label"], 0) + 1
    assert dict(rows) == counts and set(counts) <= {"PER", "ORG", "LOC", "MISC"}


@pytest.mark.slow
def test_rerun_skips_completed_units_and_other_options_are_refused(tiny_model_dir, corpus, annotated):
    before = {p: p.stat().st_mtime_ns for p in annotated.glob("part-*.parquet")}
    result = annotate(tiny_model_dir, corpus, "--output", annotated, "--max-length", 48, "--read-rows", 16)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in annotated.glob("part-*.parquet")} == before
    refused = annotate(tiny_model_dir, corpus, "--output", annotated, "--max-length", 48, "--aggregation", "max")
    assert refused.exit_code != 0 and "different run" in refused.output and "aggregation" in refused.output
    assert {p: p.stat().st_mtime_ns for p in annotated.glob("part-*.parquet")} == before


@pytest.mark.slow
def test_a_different_model_is_refused_unless_overwrite(tiny_model_dir, tmp_path, corpus):
    from models import build_tiny_model

    out = tmp_path / "out"
    assert annotate(tiny_model_dir, corpus / "b.parquet", "--output", out).exit_code == 0
    other = build_tiny_model(tmp_path / "other")
    refused = annotate(other, corpus / "b.parquet", "--output", out)
    assert refused.exit_code != 0 and "model" in refused.output and "--overwrite" in refused.output
    assert annotate(other, corpus / "b.parquet", "--output", out, "--overwrite").exit_code == 0
    meta = pq.read_schema(out / "part-00000.parquet").metadata
    assert json.loads(meta[b"nerbatch.model"]) == str(other.resolve())


@pytest.mark.slow
def test_a_crash_before_marking_or_during_assembly_is_repaired_by_a_rerun(
    tiny_model_dir, corpus, annotated, tmp_path, monkeypatch
):
    """Killed after publishing a piece but before marking it done, then killed after renaming the
    output file into place but before recording it: each rerun redoes exactly what is missing."""
    out = tmp_path / "out"
    args = ("--output", out, "--max-length", 48, "--read-rows", 16)
    mark_done, mark_assembled = RunDir.mark_done, RunDir.mark_assembled

    def killed_at_unit_2(self, unit, stats, rank=0):
        if unit.index == 2:
            raise KeyboardInterrupt
        mark_done(self, unit, stats, rank)

    monkeypatch.setattr(RunDir, "mark_done", killed_at_unit_2)
    assert annotate(tiny_model_dir, corpus, *args).exit_code == 1
    assert (out / "_nerbatch" / "pieces" / "unit-000002.parquet").exists() and not list(out.glob("*.parquet"))
    stats = collect_stats(out)  # the piece of unit 2, not marked done, is not counted
    done_rows = sum(json.loads(m.read_text())["rows"] for m in (out / "_nerbatch" / "done").iterdir())
    assert stats["units"]["done"] == 2 and stats["pieces"] == 2 and stats["rows"] == done_rows > 0
    monkeypatch.setattr(RunDir, "mark_done", mark_done)
    monkeypatch.setattr(RunDir, "mark_assembled", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    (out / "_nerbatch" / "tmp" / "unit-000003.rank0.parquet").write_bytes(b"half a piece")
    assert annotate(tiny_model_dir, corpus, *args).exit_code == 1
    assert (out / "part-00000.parquet").exists() and not (out / "_nerbatch" / "files").exists()
    monkeypatch.setattr(RunDir, "mark_assembled", mark_assembled)
    assert annotate(tiny_model_dir, corpus, *args).exit_code == 0
    assert read_output(out).equals(read_output(annotated))
    assert [p.name for p in out.glob("*.parquet")] == ["part-00000.parquet"]
    assert not list((out / "_nerbatch" / "pieces").iterdir()) and (out / "_nerbatch" / "stats.json").exists()


@pytest.mark.slow
def test_missing_text_column_is_an_error_naming_file_and_column(tiny_model_dir, corpus, tmp_path):
    result = annotate(tiny_model_dir, corpus, "--output", tmp_path / "out", "--text-column", "body")
    assert result.exit_code != 0
    assert "a.parquet" in result.output and "'body'" in result.output and "doc_id" in result.output
    assert not (tmp_path / "out").exists()  # refused before any work
    result = annotate(tiny_model_dir, corpus, "--output", tmp_path / "out", "--id-column", "newid")
    assert result.exit_code != 0 and "'newid'" in result.output


@pytest.mark.slow
def test_unreadable_parquet_is_an_error_before_any_work(tiny_model_dir, corpus, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    result = annotate(tiny_model_dir, corpus / "b.parquet", bad, "--output", tmp_path / "out")
    assert result.exit_code != 0 and "bad.parquet" in result.output and "not a readable Parquet" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_corrupt_file_fails_its_unit_only(tiny_model_dir, corpus, tmp_path):
    """Footer fine, data pages garbage: the unit fails loudly, the other units' parts are complete."""
    table = pq.read_table(corpus / "b.parquet")
    inputs = good_and_corrupt_inputs(table, tmp_path)
    out = tmp_path / "out"
    result = annotate(tiny_model_dir, inputs, "--output", out, "--id-column", "doc_id")
    assert result.exit_code != 0
    assert "zcorrupt.parquet" in result.output and "failed" in result.output
    # the good unit is done and kept; the output file that would hold both is not published half
    assert not list(out.glob("*.parquet")) and (out / "_nerbatch" / "done" / "unit-000000.json").exists()
    assert pq.read_table(out / "_nerbatch" / "pieces" / "unit-000000.parquet").num_rows == table.num_rows
    assert not (out / "_nerbatch" / "stats.json").exists()  # the run is not complete
    assert [p.name for p in (out / "_nerbatch" / "tmp").iterdir()] == []
    pq.write_table(table, inputs / "zcorrupt.parquet", compression="zstd")  # the input is repaired
    assert annotate(tiny_model_dir, inputs, "--output", out, "--id-column", "doc_id").exit_code == 0
    assert pq.read_table(out / "part-00000.parquet")["doc_id"].to_pylist() == table["doc_id"].to_pylist() * 2


@pytest.mark.slow
def test_a_unit_out_of_gpu_memory_fails_with_the_reason_and_the_others_finish(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    import torch

    from nerbatch.inference import Tagger

    launch, calls = Tagger.launch, []

    def out_of_memory_once(self, documents):
        calls.append(len(calls))
        if len(calls) == 3:  # the third chunk: in the first unit (40 rows, chunks of 16)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return launch(self, documents)

    monkeypatch.setattr(Tagger, "launch", out_of_memory_once)
    out = tmp_path / "out"
    result = annotate(tiny_model_dir, corpus, "--output", out, "--max-length", 48, "--read-rows", 16)
    assert result.exit_code != 0 and "1 unit(s) failed" in result.output
    stats = collect_stats(out)
    assert stats["units"] == {"total": 4, "done": 3, "failed": 1, "missing": 0}
    [failed] = stats["failed_units"]
    assert failed["unit"] == "unit-000000" and "OutOfMemoryError: CUDA out of memory" in failed["error"]
    assert [p.name for p in (out / "_nerbatch" / "tmp").iterdir()] == []  # its half-written piece is gone


@pytest.mark.slow
def test_id_column_is_passed_through_with_its_type(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    assert annotate(tiny_model_dir, corpus / "b.parquet", "--output", out, "--id-column", "doc_id").exit_code == 0
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.field("doc_id").type == pa.int64()
    assert table.column_names == ["doc_id", "entities", "error", "n_windows"]
    assert table["doc_id"].to_pylist() == pq.read_table(corpus / "b.parquet")["doc_id"].to_pylist()


def test_text_the_tokenizer_drops_entirely_is_flagged(tiny_model_dir, tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["\u200b\u200b\x07", "Talks in Paris ."]}), source)
    out = tmp_path / "out"
    assert annotate(tiny_model_dir, source, "--output", out).exit_code == 0
    table = read_output(out)
    assert table["error"].to_pylist()[0].startswith("no tokens")
    assert table["error"].to_pylist()[1] is None and table["n_windows"].to_pylist() == [0, 1]


def test_output_directory_inside_the_input_directory_is_not_read_back(tiny_model_dir, tmp_path):
    pq.write_table(pa.table({"text": ["Talks in Paris .", "Rome"]}), tmp_path / "in.parquet")
    out = tmp_path / "annotated"
    for _ in range(2):  # the rerun must see the same single input, not its own part files
        result = annotate(tiny_model_dir, tmp_path, "--output", out)
        assert result.exit_code == 0, result.output
    assert read_output(out).num_rows == 2


def test_an_input_rewritten_under_the_same_name_is_refused_not_mixed(tiny_model_dir, tmp_path):
    """Same path, same row groups and row counts, other rows: a resume would mix the two versions."""
    source, out = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pa.table({"text": ["Talks in Paris .", "Rome wins ."]}), source)
    assert annotate(tiny_model_dir, source, "--output", out).exit_code == 0
    pq.write_table(pa.table({"text": ["Oslo talks .", "Berlin wins ."]}), source)
    refused = annotate(tiny_model_dir, source, "--output", out)
    assert refused.exit_code != 0 and f"input {source} (its content: the Parquet footer)" in refused.output
    pq.write_table(pa.table({"text": ["Talks in Paris .", "Rome wins ."]}), source)  # the same table again
    assert annotate(tiny_model_dir, source, "--output", out).exit_code == 0


def test_an_added_input_file_is_named_in_the_refusal(tiny_model_dir, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    pq.write_table(pa.table({"text": ["Talks in Paris ."]}), inputs / "a.parquet")
    assert annotate(tiny_model_dir, inputs, "--output", out).exit_code == 0
    pq.write_table(pa.table({"text": ["Rome wins ."]}), inputs / "z.parquet")
    refused = annotate(tiny_model_dir, inputs, "--output", out)
    assert "inputs (1 units, now 2; unit 1 is the first to differ): was null, now [" in refused.output
    assert "z.parquet" in refused.output


def test_a_text_that_is_not_utf8_is_flagged_on_its_own_row(tiny_model_dir, tmp_path):
    """Parquet writers need not check UTF-8: one bad cell must not fail the other rows of its unit."""
    raw = pa.array([b"Talks in Paris .", b"Caf\xe9 in Rome", b"Rome wins ."], pa.binary())
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 3, raw.buffers())}), source)
    out = tmp_path / "out"
    assert annotate(tiny_model_dir, source, "--output", out).exit_code == 0
    table = read_output(out)
    assert table["error"].to_pylist() == [None, "text is not valid UTF-8 (byte 0xe9 at byte offset 3)", None]
    assert table["n_windows"].to_pylist() == [1, 0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_holding_other_files_is_refused_and_left_alone(tiny_model_dir, corpus, tmp_path, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "data.parquet")
    (out / ".DS_Store").write_text("hidden names are skipped by every reader")
    result = annotate(tiny_model_dir, corpus / "b.parquet", "--output", out, *(["--overwrite"] if overwrite else []))
    assert (
        result.exit_code != 0 and "holds files that `nerbatch annotate` did not write (data.parquet)" in result.output
    )
    assert ("--overwrite only replaces" in result.output) == overwrite
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "data.parquet"]


@pytest.mark.slow
def test_cpu_lanes_write_the_same_output_and_a_lane_failure_fails_its_unit(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    import threading

    import torch

    import nerbatch.inference
    from nerbatch.inference import InFlight, Tagger

    threads = torch.get_num_threads()
    launch, ran = Tagger.launch, set()

    def noting_lanes(self, documents):
        ran.add((self.lane_count, self.lanes is not None))
        return launch(self, documents)

    monkeypatch.setattr(Tagger, "launch", noting_lanes)
    tables = {}
    for lanes in (1, 2):
        monkeypatch.setattr(nerbatch.inference, "cpu_lanes", lambda device, n=lanes: n)
        out = tmp_path / f"lanes-{lanes}"
        result = annotate(tiny_model_dir, corpus, "--output", out, "--max-length", 48, "--read-rows", 16)
        assert result.exit_code == 0, result.output
        tables[lanes] = read_output(out)
    assert ran == {(1, False), (2, True)}
    assert tables[1].num_rows == 164 and tables[2].equals(tables[1])

    run_batch, calls, lock = Tagger.run_batch, [], threading.Lock()
    cancel, cancelled = InFlight.cancel, []

    def fails_once(self, ids, mask):
        with lock:  # two lanes count at once
            calls.append(len(calls))
            third = len(calls) == 3
        if third:  # a batch of the first unit, in a lane
            raise RuntimeError("a lane broke")
        return run_batch(self, ids, mask)

    def noting_cancel(flight):
        cancelled.append(len(flight.batches))
        cancel(flight)

    monkeypatch.setattr(Tagger, "run_batch", fails_once)
    monkeypatch.setattr(InFlight, "cancel", noting_cancel)
    out = tmp_path / "failing"
    try:
        result = annotate(tiny_model_dir, corpus, "--output", out, "--max-length", 48, "--read-rows", 16)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code != 0 and "1 unit(s) failed" in result.output
    stats = collect_stats(out)
    assert stats["units"] == {"total": 4, "done": 3, "failed": 1, "missing": 0}
    assert "RuntimeError: a lane broke" in stats["failed_units"][0]["error"]
    assert len(cancelled) == 2  # the failed unit's chunk and the one queued after it stop their batches
