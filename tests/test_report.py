"""`nerbatch.report` on real annotate outputs: stats against the Parquet files, bookkeeping states,
texts recovered for `show`, and the terminal and HTML renderings."""

from __future__ import annotations

import html
import json
import random
import re
import shutil
import string
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.cli import main
from nerbatch.report import (
    ReportError,
    collect_stats,
    format_stats,
    render_html,
    render_terminal,
    sample_documents,
)

from conftest import DEMO_DATA

# Rows the annotate job flags, and a text whose markup the HTML page must escape.
EXTRA = {
    "extra-empty": "",
    "extra-blank": " \t\n ",
    "extra-markup": "<script>alert('x')</script> Talks between Paris & Rome resumed on Monday.",
    "extra-short": "Angela Merkel met Emmanuel Macron in Paris.",
}
ANSI = re.compile(r"\033\[[0-9;]*m")


def annotate(model: Path, *args) -> object:
    return CliRunner().invoke(main, ["annotate", str(model), *map(str, args), "--no-progress"], catch_exceptions=False)


def output_rows(out: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))).to_pylist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 rows: the 26 demo documents (one null, one whitespace-only text) and EXTRA; a.parquet in row
    groups of 9 (two units), b.parquet whole (one unit)."""
    rows = [json.loads(line) for line in (DEMO_DATA / "documents.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += [{"doc_id": doc_id, "text": text} for doc_id, text in EXTRA.items()]
    table = pa.table({"doc_id": [r["doc_id"] for r in rows], "text": pa.array([r["text"] for r in rows], pa.string())})
    directory = tmp_path_factory.mktemp("corpus")
    pq.write_table(table.slice(0, 18), directory / "a.parquet", row_group_size=9)
    pq.write_table(table.slice(18), directory / "b.parquet")
    return directory


@pytest.fixture(scope="module")
def input_rows(corpus) -> list[dict]:
    """Every input row with its `source_file` and `row_index` as annotate records them."""
    rows = []
    for name in ["a.parquet", "b.parquet"]:
        for index, row in enumerate(pq.read_table(corpus / name).to_pylist()):
            rows.append({"source_file": str((corpus / name).resolve()), "row_index": index, **row})
    return rows


@pytest.fixture(scope="module")
def plain_out(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    result = annotate(tiny_model_dir, corpus, "--output", out, "--read-rows", 8, "--file-rows", 9)  # 3 files
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def id_out(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("by-id") / "out"
    result = annotate(tiny_model_dir, corpus, "--output", out, "--id-column", "doc_id")
    assert result.exit_code == 0, result.output
    return out


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
    assert json.loads(json.dumps(stats)) == stats


def test_format_stats_is_an_aligned_report(plain_out):
    stats = collect_stats(plain_out)
    report = format_stats(stats)
    assert "complete: 3 of 3 units done" in report and "30 in 3 output files" in report
    labels = stats["entities_by_label"]
    lines = {line.split()[0]: line for line in report.splitlines() if line.split()[0] in labels}
    assert {label: line.split()[1:] for label, line in lines.items()} == {k: [f"{n:,}"] for k, n in labels.items()}
    assert len({len(line) for line in lines.values()}) == 1  # counts right-aligned in one column
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
    assert annotate(tiny_model_dir, inputs, "--output", out).exit_code != 0
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


def test_show_recovers_texts_by_source_file_and_row(plain_out, input_rows):
    docs = sample_documents(plain_out, 12, seed=3)
    assert len(docs) == 12
    texts = {(r["source_file"], r["row_index"]): r["text"] for r in input_rows}
    output = {(r["source_file"], r["row_index"]): r for r in output_rows(plain_out)}
    for doc in docs:
        key = (doc["id"]["source_file"], doc["id"]["row_index"])
        assert list(doc["id"]) == ["source_file", "row_index"]
        assert doc["text"] == texts[key]
        assert (doc["entities"], doc["error"]) == (output[key]["entities"], output[key]["error"])


def test_show_recovers_texts_by_id_column(id_out, input_rows):
    docs = sample_documents(id_out, 12, seed=3)
    assert len(docs) == 12
    texts = {r["doc_id"]: r["text"] for r in input_rows}
    output = {r["doc_id"]: r for r in output_rows(id_out)}
    for doc in docs:
        assert list(doc["id"]) == ["doc_id"]
        assert doc["text"] == texts[doc["id"]["doc_id"]]
        assert doc["entities"] == output[doc["id"]["doc_id"]]["entities"]
        assert all(doc["text"][e["start"] : e["end"]] == e["text"] for e in doc["entities"])


def test_sampling_is_deterministic_and_keeps_flagged_rows(plain_out, input_rows):
    first = sample_documents(plain_out, 6, seed=7)
    assert sample_documents(plain_out, 6, seed=7) == first
    samples = [sample_documents(plain_out, 6, seed=seed) for seed in range(25)]
    assert len({tuple(d["id"]["row_index"] for d in s) for s in samples}) > 1
    flagged = [d for s in samples for d in s if d["error"]]
    assert {d["error"] for d in flagged} == {"null text", "empty text", "whitespace-only text"}
    assert len(sample_documents(plain_out, 100, seed=0)) == len(input_rows)


def test_rows_with_nothing_to_show_give_way_to_rows_with_entities(plain_out, tmp_path):
    """The random model finds entities in every text, so clear them from two rows in three (a copy)."""
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    for part in out.glob("part-*.parquet"):
        table = pq.read_table(part)
        entities = [e if i % 3 == 0 else [] for i, e in enumerate(table["entities"].to_pylist())]
        column = table.schema.get_field_index("entities")
        pq.write_table(table.set_column(column, "entities", pa.array(entities, table["entities"].type)), part)
    rows = output_rows(out)
    with_entities = sum(bool(r["entities"]) for r in rows)
    assert sum(not r["entities"] and r["error"] is None for r in rows) > with_entities > 5
    for seed in range(20):
        assert all(d["entities"] or d["error"] for d in sample_documents(out, with_entities, seed))
    assert len(sample_documents(out, len(rows), 0)) == len(rows)  # and once they run out, the others come


def test_html_marks_hold_exactly_the_escaped_entity_texts(plain_out):
    docs = sample_documents(plain_out, 100, seed=0)
    page = render_html(docs, "sample <of> out")
    annotated = [d for d in docs if d["error"] is None]
    spans = [(d["text"][e["start"] : e["end"]], e["label"]) for d in annotated for e in d["entities"]]
    marks = re.findall(r'<mark [^>]*data-label="([^"]*)"[^>]*>(.*?)</mark>', page, re.S)
    assert marks == [(label, html.escape(text)) for text, label in spans] and marks
    # each document's body, tags removed, is its whole text escaped: nothing lost, doubled or left raw
    bodies = re.findall(r'<div class="text">(.*?)</div>', page, re.S)
    assert [re.sub(r"<[^>]+>", "", b) for b in bodies] == [html.escape(d["text"]) for d in annotated]
    assert any(d["text"].startswith("<script>") for d in annotated) and "<script" not in page.lower()
    assert page.count("<article>") == len(docs) and "<title>sample &lt;of&gt; out</title>" in page
    for label, count in Counter(label for _, label in spans).items():
        assert f">{label}</span> {count:,}</li>" in page
    assert not re.search(r"http|src=|url\(|@import|<link", page, re.I)
    assert "flagged: null text" in page and "flagged: whitespace-only text" in page


def test_terminal_marks_entities_and_colours_only_when_asked(plain_out):
    docs = sample_documents(plain_out, 100, seed=0)
    plain = render_terminal(docs, color=False, max_chars=10_000)
    coloured = render_terminal(docs, color=True, max_chars=10_000)
    assert "\033" not in plain and "\033[" in coloured and ANSI.sub("", coloured) == plain
    for doc in docs:
        for e in doc["entities"]:
            assert f"[{doc['text'][e['start'] : e['end']].replace(chr(13) + chr(10), chr(10))}|{e['label']}]" in plain
    assert "more characters" not in plain and "(flagged: null text)" in plain and "' \\t\\n '" in plain


def test_long_texts_are_cut_in_the_terminal_only_and_never_inside_an_entity():
    text = "Paris " * 100
    entities = [{"start": i, "end": i + 5, "label": "LOC", "text": "Paris", "score": 0.9} for i in range(6, 600, 12)]
    doc = {"id": {"doc_id": "long"}, "text": text, "entities": entities, "error": None}
    shown = render_terminal([doc], color=False, max_chars=9)
    assert shown.splitlines()[1] == f"Paris [Paris|LOC]… ({len(text) - 11} more characters)"
    assert render_html([doc], "long").count("<mark ") == len(entities)


def test_overlapping_spans_are_skipped_and_control_characters_escaped():
    text = "New York City\r\nis \x1b[31mbig"
    entities = [
        {"start": 0, "end": 8, "label": "LOC", "text": "New York", "score": 0.9},
        {"start": 4, "end": 13, "label": "ORG", "text": "York City", "score": 0.5},  # overlaps: skipped
        {"start": 9, "end": 13, "label": "LOC", "text": "City", "score": 0.8},
        {"start": 20, "end": 99, "label": "PER", "text": "", "score": 0.1},  # past the end: skipped
    ]
    doc = {"id": {"doc_id": 1}, "text": text, "entities": entities, "error": None}
    shown = render_terminal([doc], color=False)
    assert shown.splitlines()[1:] == ["[New York|LOC] [City|LOC]", "is \\x1b[31mbig"]
    page = render_html([doc], "t")
    assert re.findall(r"<mark [^>]*>(.*?)</mark>", page) == ["New York", "City"]


def test_show_refuses_inputs_that_changed_since_the_run(tiny_model_dir, tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["Angela Merkel met Emmanuel Macron in Paris ."] * 3}), source)
    out = tmp_path / "out"
    assert annotate(tiny_model_dir, source, "--output", out).exit_code == 0
    assert collect_stats(out)["entities"] > 0
    pq.write_table(pa.table({"text": ["Something else entirely, and longer than before ."] * 3}), source)
    with pytest.raises(ReportError, match="does not match"):
        sample_documents(out, 3, 0)
    source.unlink()
    with pytest.raises(ReportError, match="not found"):
        sample_documents(out, 3, 0)


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


def test_show_finds_the_text_of_each_row_when_ids_repeat(tiny_model_dir, tmp_path):
    """annotate does not need unique ids; show takes, among an id's texts, the one its entities fit."""
    texts = ["Angela Merkel met Emmanuel Macron in Paris .", "Talks in Rome and Berlin resumed .", "Oslo wins ."]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc_id": [7, 7, 7], "text": texts}), source)
    out = tmp_path / "out"
    assert annotate(tiny_model_dir, source, "--output", out, "--id-column", "doc_id").exit_code == 0
    docs = sample_documents(out, 3, 0)
    with_entities = [d for d in docs if d["entities"]]
    assert len(with_entities) >= 2
    for doc in with_entities:
        assert all(doc["text"][e["start"] : e["end"]] == e["text"] for e in doc["entities"])
    rows = output_rows(out)
    assert sorted(d["text"] for d in with_entities) == sorted(t for t, r in zip(texts, rows) if r["entities"])


def test_show_refuses_ids_it_cannot_look_up_in_one_line(tiny_model_dir, tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc_id": [{"x": 1}, {"x": 2}], "text": ["Talks in Paris .", "Rome wins ."]}), source)
    out = tmp_path / "out"
    assert annotate(tiny_model_dir, source, "--output", out, "--id-column", "doc_id").exit_code == 0
    result = CliRunner().invoke(main, ["show", str(out), "--sample", "2"])
    assert result.exit_code == 1 and "doc_id holds dict values" in result.output and "Traceback" not in result.output


def test_stats_names_a_foreign_parquet_file_in_the_output(plain_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    pq.write_table(pa.table({"x": [1]}), out / "zz-notes.parquet")
    result = CliRunner().invoke(main, ["stats", str(out)])
    assert result.exit_code == 1 and "zz-notes.parquet: no column 'error'" in result.output


@pytest.mark.parametrize("by_id", [False, True])
def test_show_reads_back_a_text_that_is_not_utf8_as_missing(tiny_model_dir, tmp_path, by_id):
    raw = pa.array([b"Talks in Paris .", b"Caf\xe9 in Rome", b"Rome wins ."], pa.binary())
    table = pa.table({"doc_id": [1, 2, 3], "text": pa.Array.from_buffers(pa.string(), 3, raw.buffers())})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    args = ["--id-column", "doc_id"] if by_id else []
    assert annotate(tiny_model_dir, tmp_path / "in.parquet", "--output", out, *args).exit_code == 0
    docs = sample_documents(out, 3, 0)
    flagged = [d for d in docs if d["error"]]
    assert len(docs) == 3 and [d["text"] for d in flagged] == [None]
    assert flagged[0]["error"].startswith("text is not valid UTF-8")
