"""`nerbatch show` on real annotate outputs: texts recovered by row or id, the sample, and the
terminal and HTML renderings."""

from __future__ import annotations

import html
import re
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.cli import main
from nerbatch.rundir import ReportError
from nerbatch.show import render_html, render_terminal, sample_documents
from nerbatch.stats import collect_stats

from helpers import annotate_in_process, output_rows

ANSI = re.compile(r"\033\[[0-9;]*m")


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
    assert annotate_in_process(tiny_model_dir, source, "--output", out).exit_code == 0
    assert collect_stats(out)["entities"] > 0
    pq.write_table(pa.table({"text": ["Something else entirely, and longer than before ."] * 3}), source)
    with pytest.raises(ReportError, match="does not match"):
        sample_documents(out, 3, 0)
    source.unlink()
    with pytest.raises(ReportError, match="not found"):
        sample_documents(out, 3, 0)


def test_show_finds_the_text_of_each_row_when_ids_repeat(tiny_model_dir, tmp_path):
    """annotate does not need unique ids; show takes, among an id's texts, the one its entities fit."""
    texts = ["Angela Merkel met Emmanuel Macron in Paris .", "Talks in Rome and Berlin resumed .", "Oslo wins ."]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc_id": [7, 7, 7], "text": texts}), source)
    out = tmp_path / "out"
    assert annotate_in_process(tiny_model_dir, source, "--output", out, "--id-column", "doc_id").exit_code == 0
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
    assert annotate_in_process(tiny_model_dir, source, "--output", out, "--id-column", "doc_id").exit_code == 0
    result = CliRunner().invoke(main, ["show", str(out), "--sample", "2"])
    assert result.exit_code == 1 and "doc_id holds dict values" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("by_id", [False, True])
def test_show_reads_back_a_text_that_is_not_utf8_as_missing(tiny_model_dir, tmp_path, by_id):
    raw = pa.array([b"Talks in Paris .", b"Caf\xe9 in Rome", b"Rome wins ."], pa.binary())
    table = pa.table({"doc_id": [1, 2, 3], "text": pa.Array.from_buffers(pa.string(), 3, raw.buffers())})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    args = ["--id-column", "doc_id"] if by_id else []
    assert annotate_in_process(tiny_model_dir, tmp_path / "in.parquet", "--output", out, *args).exit_code == 0
    docs = sample_documents(out, 3, 0)
    flagged = [d for d in docs if d["error"]]
    assert len(docs) == 3 and [d["text"] for d in flagged] == [None]
    assert flagged[0]["error"].startswith("text is not valid UTF-8")
