"""`nerbatch show`: a random sample of annotated documents with their entities highlighted, in the
terminal or as a self-contained HTML page.

Rows are drawn from the output files (and the pieces of units not yet assembled) by a streaming
uniform sample; their texts are read back from the run's inputs, by id column or by source file and
row, and checked against the entities before anything is rendered. Nothing here writes to OUT_DIR.
"""

from __future__ import annotations

import html
from bisect import bisect_right
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nerbatch.parquet_io import Undecodable, open_parquet, read_batches, text_values
from nerbatch.rundir import META, ReportError, RunDir
from nerbatch.storage import Location, locate

SOURCE_ID = ["source_file", "row_index"]
TERMINAL_CHARS = 1_500  # longer texts are cut in the terminal (never in the HTML page)

ANSI = ["\033[1;34m", "\033[1;32m", "\033[1;33m", "\033[1;35m", "\033[1;36m", "\033[1;31m"]
ANSI_RESET = "\033[0m"
HTML_COLOURS = ["#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#fb9a99", "#ffff99", "#8dd3c7", "#d9d9d9"]

# Control characters would let a document move the cursor or recolour the terminal: show them
# escaped. Newlines and tabs are layout and stay.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}

PAGE_CSS = """\
body { font: 16px/1.5 system-ui, sans-serif; color: #222; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.4rem; }
.legend { display: flex; flex-wrap: wrap; gap: .5rem 1.2rem; padding: 0; list-style: none; }
.chip { padding: .1em .45em; border-radius: .35em; font-size: .8em; font-weight: bold; }
article { border-top: 1px solid #ddd; padding: .4rem 0 1rem; }
h2 { font-size: 1rem; margin: .6rem 0; overflow-wrap: anywhere; }
h2 small { color: #666; font-weight: normal; margin-left: .6em; }
.text { white-space: pre-wrap; line-height: 2.1; }
mark { padding: .15em .35em; border-radius: .35em; color: inherit; }
mark::after { content: attr(data-label); font-size: .65em; font-weight: bold; margin-left: .4em; opacity: .7; }
h2 small.flag { color: #a00; font-weight: bold; }
.raw { background: #f4f4f4; padding: .3em .5em; white-space: pre-wrap; }
"""


def sample_documents(out_dir: str | Path, n: int, seed: int = 0) -> list[dict]:
    """`n` output rows chosen at random (the same for the same seed), with their texts.

    Each is a dict: "id" (the id column, or `source_file` and `row_index`), "text" (read back from
    the run's inputs), "entities" and "error". Rows with entities are preferred over rows with
    neither entities nor an error; flagged rows are kept when drawn. Raises `ReportError` when a
    text cannot be found or no longer matches its entities (inputs changed since the run).
    """
    out = RunDir(out_dir)
    run = out.read_run()
    options = run.config["options"]
    id_fields = [options["id_column"]] if options["id_column"] else SOURCE_ID
    files = out.written_files()
    docs = []
    for file_index, rows in _group(_pick_rows(files, n, seed)).items():
        for row in _read_rows(files[file_index], rows, [*id_fields, "entities", "error"]):
            docs.append({"id": {f: row[f] for f in id_fields}, "entities": row["entities"], "error": row["error"]})
    if options["id_column"]:
        inputs = list(dict.fromkeys(path for path, _, _ in run.config["inputs"]))
        _attach_texts_by_id(docs, inputs, options["id_column"], options["text_column"])
    else:
        _attach_texts_by_row(docs, options["text_column"])
    for doc in docs:
        _check_text(doc, out_dir)
    return docs


def _pick_rows(files: list[Location], n: int, seed: int) -> list[tuple[int, int]]:
    """(file index, row) of the rows to show, in file order.

    A uniform sample (the `n` lowest of one random key per row, kept while streaming), in which rows
    with nothing to show (no entity, no error) give way to the lowest-keyed rows with entities.
    """
    rng = np.random.default_rng(seed)
    drawn, with_entities = _Lowest(n), _Lowest(n)
    for file_index, path in enumerate(files):
        first = 0
        for batch in read_batches(path, ["entities", "error"]):
            keys = rng.random(batch.num_rows)
            has = pc.greater(pc.list_value_length(batch.column("entities")), 0)
            has = pc.fill_null(has, False).to_numpy(zero_copy_only=False)
            plain = ~has & ~batch.column("error").is_valid().to_numpy(zero_copy_only=False)
            rows = np.arange(first, first + batch.num_rows)
            first += batch.num_rows
            found = np.column_stack([np.full_like(rows, file_index), rows, plain])
            drawn.offer(keys, found)
            with_entities.offer(keys[has], found[has])
    drawn_rows = drawn.rows.tolist()
    keep = [(f, r) for f, r, is_plain in drawn_rows if not is_plain]
    empty = [(f, r) for f, r, is_plain in drawn_rows if is_plain]
    taken = set(keep)
    spare = [(f, r) for f, r, _ in with_entities.rows.tolist() if (f, r) not in taken]
    chosen = keep + spare[: n - len(keep)]
    return sorted(chosen + empty[: n - len(chosen)])


class _Lowest:
    """The `n` rows with the lowest random keys offered so far: a uniform sample of a stream."""

    def __init__(self, n: int):
        self.n = n
        self.keys = np.empty(0)
        self.rows = np.empty((0, 3), dtype=np.int64)

    def offer(self, keys: np.ndarray, rows: np.ndarray) -> None:
        keys = np.concatenate([self.keys, keys])
        rows = np.concatenate([self.rows, rows.astype(np.int64)])
        keep = np.argsort(keys, kind="stable")[: self.n]
        self.keys, self.rows = keys[keep], rows[keep]


def _group(picks: list[tuple[int, int]]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for file_index, row in picks:
        grouped.setdefault(file_index, []).append(row)
    return grouped


def _read_rows(path: Location, rows: list[int], columns: list[str]) -> list[dict]:
    """Rows `rows` (indices in the file) of `columns`, reading only the row groups that hold them."""
    source = open_parquet(path)
    meta = source.metadata
    starts = [0]  # first row of each row group, then the row count
    for group in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(group).num_rows)
    if any(not 0 <= row < meta.num_rows for row in rows):
        raise ReportError(f"{path}: has {meta.num_rows} rows, fewer than the output refers to (changed since the run?)")
    group_of = {row: bisect_right(starts, row) - 1 for row in rows}
    groups = sorted(set(group_of.values()))
    offsets, read = {}, 0  # where each group read starts in the table read_row_groups returns
    for group in groups:
        offsets[group], read = read, read + starts[group + 1] - starts[group]
    table = source.read_row_groups(groups, columns=columns, use_threads=False)
    taken = table.take([offsets[group_of[row]] + row - starts[group_of[row]] for row in rows])
    values = {name: _readable(taken.column(name)) for name in columns}
    return [{name: values[name][i] for name in columns} for i in range(taken.num_rows)]


def _readable(column) -> list:
    """A column's values; a string cell that is not UTF-8 (annotate flagged its row) reads as None."""
    return [None if isinstance(v, Undecodable) else v for v in text_values(column)]


def _attach_texts_by_row(docs: list[dict], text_column: str) -> None:
    by_file: dict[str, list[dict]] = {}
    for doc in docs:
        by_file.setdefault(doc["id"]["source_file"], []).append(doc)
    for source, group in by_file.items():
        _require_input(source)
        rows = _read_rows(locate(source), [doc["id"]["row_index"] for doc in group], [text_column])
        for doc, row in zip(group, rows):
            doc["text"] = row[text_column]


def _attach_texts_by_id(docs: list[dict], inputs: list[str], id_column: str, text_column: str) -> None:
    """Scan the inputs' id and text columns for the docs' ids.

    An id may name several input rows (ids need not be unique for annotate): each doc takes the
    first of its id's texts that its entities fit (`_check_text` then catches a text that fits none)."""
    wanted = {_id_key(doc["id"][id_column], id_column) for doc in docs}
    texts: dict = {}

    def found() -> bool:  # every doc has a text its entities fit: stop reading
        return all(any(_fits(t, d["entities"]) for t in texts.get(d["id"][id_column], ())) for d in docs)

    for source in inputs:
        if found():
            break
        _require_input(source)
        id_type = open_parquet(locate(source)).schema_arrow.field(id_column).type
        if pa.types.is_dictionary(id_type):
            id_type = id_type.value_type
        value_set = pa.array(list(wanted), type=id_type)
        for batch in read_batches(locate(source), [id_column, text_column]):
            matched = batch.filter(pc.is_in(batch.column(id_column), value_set=value_set))
            for key, text in zip(matched.column(id_column).to_pylist(), _readable(matched.column(text_column))):
                texts.setdefault(key, []).append(text)
            if found():
                break
    missing = [value for value in wanted if value not in texts]
    if missing:
        raise ReportError(
            f"{id_column} {', '.join(map(repr, missing[:5]))}: not found in the inputs recorded in "
            f"{META}/config.json (changed or moved since the run?)"
        )
    for doc in docs:
        candidates = texts[doc["id"][id_column]]
        doc["text"] = next((t for t in candidates if _fits(t, doc["entities"])), candidates[0])


def _id_key(value, id_column: str):
    """`value` as a dictionary key; ids that cannot be looked up (lists, structs, NaN) are an error."""
    try:
        hash(value)
    except TypeError:
        raise ReportError(
            f"{id_column} holds {type(value).__name__} values: `show` finds texts by id, so it needs ids "
            "of a plain type (string, integer, date...); read the output with DuckDB or pyarrow instead"
        ) from None
    if value != value:  # NaN: equal to nothing, itself included
        raise ReportError(f"{id_column} NaN: a NaN id cannot be looked up in the inputs")
    return value


def _fits(text, entities: list[dict]) -> bool:
    """Whether `entities` can be spans of `text` (any text fits none: a flagged row has no entities)."""
    return not entities or (isinstance(text, str) and all(text[e["start"] : e["end"]] == e["text"] for e in entities))


def _require_input(source: str) -> None:
    if not locate(source).is_file():
        raise ReportError(f"{source}: input of the run not found (moved or deleted?); cannot recover its texts")


def _check_text(doc: dict, out_dir: str | Path) -> None:
    text = doc["text"] if isinstance(doc["text"], str) else ""
    for entity in doc["entities"]:
        if not _fits(text, [entity]):
            raise ReportError(
                f"{out_dir}: the input text of {_heading(doc)} does not match its entity {entity['text']!r} "
                f"at {entity['start']}-{entity['end']} (the input changed since the run?)"
            )


def _heading(doc: dict) -> str:
    """How a document is named: its id, or its source file and row index."""
    ids = doc["id"]
    if list(ids) == SOURCE_ID:
        return f"{ids['source_file']} row {ids['row_index']}"
    return " ".join(f"{name}={value}" for name, value in ids.items())


def _summary(doc: dict) -> str:
    if doc["error"] is not None:
        return f"flagged: {doc['error']}"
    count = len(doc["entities"])
    return f"{count} entit{'y' if count == 1 else 'ies'}"


def _segments(text: str, entities: list[dict]) -> list[tuple[str, dict | None]]:
    """The text as consecutive (piece, entity or None) pairs. A span that overlaps the one before it,
    or does not lie inside the text, is skipped: nerbatch never writes one, but a hand-edited or
    foreign file might, and the rest of the document still renders."""
    pieces: list[tuple[str, dict | None]] = []
    position = 0
    for entity in sorted(entities, key=lambda e: (e["start"], e["end"])):
        start, end = entity["start"], entity["end"]
        if start < position or end > len(text) or start >= end:
            continue
        if start > position:
            pieces.append((text[position:start], None))
        pieces.append((text[start:end], entity))
        position = end
    if position < len(text):
        pieces.append((text[position:], None))
    return pieces


def _label_order(docs: list[dict]) -> dict[str, int]:
    """A colour index per label, by sorted label name so a label keeps its colour across samples."""
    labels = sorted({entity["label"] for doc in docs for entity in doc["entities"]})
    return {label: i for i, label in enumerate(labels)}


def render_terminal(docs: list[dict], color: bool, max_chars: int = TERMINAL_CHARS) -> str:
    """The documents as text, each entity marked `[text|LABEL]` (and coloured by label if `color`).

    Texts longer than `max_chars` are cut (never inside an entity), ending with "… (N more characters)".
    """
    order = _label_order(docs)
    blocks = []
    for number, doc in enumerate(docs, 1):
        heading = f"── {number}/{len(docs)}  {_visible(_heading(doc))}  ({_summary(doc)})"
        if doc["error"] is not None:
            body = "" if doc["text"] is None else f"text: {_visible(repr(doc['text'])[:max_chars])}"
        else:
            body = _terminal_text(doc, order, color, max_chars)
        blocks.append(f"{heading}\n{body}".rstrip())
    return "\n\n".join(blocks) + "\n"


def _terminal_text(doc: dict, order: dict[str, int], color: bool, max_chars: int) -> str:
    out, shown = [], 0
    for piece, entity in _segments(doc["text"], doc["entities"]):
        if shown >= max_chars:
            break
        if entity is None:
            piece = piece[: max_chars - shown]
            out.append(_visible(piece))
        else:
            mark = f"[{_visible(piece)}|{_visible(entity['label'])}]"
            out.append(f"{ANSI[order[entity['label']] % len(ANSI)]}{mark}{ANSI_RESET}" if color else mark)
        shown += len(piece)
    rest = len(doc["text"]) - shown
    if rest:
        out.append(f"… ({rest:,} more characters)")
    return "".join(out)


def _visible(text: str) -> str:
    return text.replace("\r\n", "\n").translate(_CONTROL)


def render_html(docs: list[dict], title: str) -> str:
    """One self-contained HTML page (inline CSS, no script, no external reference): a legend of the
    labels with their counts, then each document with its entities as coloured `<mark>` spans, the
    label shown as a small tag by CSS so that each `<mark>` holds exactly the entity's text."""
    order = _label_order(docs)
    counts = Counter(entity["label"] for doc in docs for entity in doc["entities"])
    colours = "".join(f".l{i} {{ background: {HTML_COLOURS[i % len(HTML_COLOURS)]}; }}\n" for i in range(len(order)))
    legend = "".join(
        f'<li><span class="chip l{order[label]}">{html.escape(label)}</span> {counts[label]:,}</li>' for label in order
    )
    articles = "\n".join(_html_document(doc, order) for doc in docs)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{PAGE_CSS}{colours}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{len(docs):,} documents; entities by label:</p>\n"
        f'<ul class="legend">{legend}</ul>\n{articles}\n</body>\n</html>\n'
    )


def _html_document(doc: dict, order: dict[str, int]) -> str:
    flagged = doc["error"] is not None
    style = ' class="flag"' if flagged else ""
    heading = f"<h2>{html.escape(_heading(doc))}<small{style}>{html.escape(_summary(doc))}</small></h2>"
    if flagged:
        raw = "" if doc["text"] is None else f'<pre class="raw">{html.escape(repr(doc["text"]))}</pre>'
        return f"<article>{heading}{raw}</article>"
    body = []
    for piece, entity in _segments(doc["text"], doc["entities"]):
        if entity is None:
            body.append(html.escape(piece))
            continue
        label = html.escape(entity["label"])
        body.append(
            f'<mark class="l{order[entity["label"]]}" data-label="{label}" '
            f'title="{label} {entity["score"]:.2f}">{html.escape(piece)}</mark>'
        )
    return f'<article>{heading}<div class="text">{"".join(body)}</div></article>'
