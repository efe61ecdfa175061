"""Input rows to model input and back: validating texts, reading a unit in tokenized chunks, and
building the output columns of a chunk.

No row is ever dropped: a text that cannot be annotated (null, empty, not a string, not valid UTF-8,
nothing the tokenizer keeps) gets an output row with the reason in `error` and no entities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from nerbatch.inference import Document, Tagger
from nerbatch.parquet_io import Undecodable, iter_batches, text_values
from nerbatch.rundir import Tally
from nerbatch.shards import Unit

NO_TOKENS = "no tokens (the tokenizer keeps no character of this text)"


@dataclass
class Chunk:
    """One record batch, validated and tokenized: carried columns, texts, per-row errors and documents."""

    carried: dict[str, list | pa.Array]  # the row's id (or source_file, row_index) and copied input columns
    texts: list
    errors: list[str | None]
    docs: list[Document | None] = field(default_factory=list)

    def documents(self) -> list[Document]:
        """The rows that go through the model."""
        return [d for d in self.docs if d is not None]


def text_error(value) -> str | None:
    """Why a text cell cannot be annotated, or None when it can."""
    if isinstance(value, Undecodable):
        return f"text is not valid UTF-8 ({value.reason})"
    if value is None:
        return "null text"
    if not isinstance(value, str):
        return f"non-string text ({type(value).__name__})"
    if not value:
        return "empty text"
    if value.isspace():
        return "whitespace-only text"
    return None


def read_chunks(
    unit: Unit, tagger: Tagger, text_column: str, carried: list[str], read_rows: int, has_id: bool
) -> Iterator[Chunk]:
    """Read, validate and tokenize the unit's record batches (runs in the prefetch thread).

    `carried` columns go to the output as Arrow arrays (their types untouched); without an id
    column (`has_id` false) each row is named by its file and row index."""
    columns = [text_column] + [c for c in carried if c != text_column]
    row = unit.first_row
    for batch in iter_batches(unit.location, unit.row_group, columns, read_rows):
        texts = text_values(batch.column(text_column))
        ids = (
            {} if has_id else {"source_file": [unit.path] * len(texts), "row_index": list(range(row, row + len(texts)))}
        )
        ids |= {name: batch.column(name) for name in carried}
        row += len(texts)
        errors = [text_error(t) for t in texts]
        good = [t for t, e in zip(texts, errors) if e is None]
        encoded = iter(tagger.encode(good))
        docs = [next(encoded) if e is None else None for e in errors]
        # e.g. only control or zero-width characters: nothing reaches the model, so say so
        errors = [NO_TOKENS if d is not None and d.n_tokens == 0 else e for d, e in zip(docs, errors)]
        docs = [d if e is None else None for d, e in zip(docs, errors)]
        yield Chunk(ids, texts, errors, docs)


def output_columns(chunk: Chunk, tagger: Tagger, tally: Tally) -> dict[str, list]:
    """Decode a chunk whose documents went through the model into output columns; count into `tally`."""
    entities, windows = [], []
    for text, doc in zip(chunk.texts, chunk.docs):
        if doc is None:
            entities.append([])
            windows.append(0)
            continue
        spans = tagger.decode(doc, text)
        entities.append([s.as_dict() for s in spans])
        windows.append(len(doc.windows))
        tally.tokens += doc.n_tokens
        tally.windows += len(doc.windows)
        tally.entities += len(spans)
    flagged = sum(e is not None for e in chunk.errors)
    tally.rows += len(chunk.texts)
    tally.flagged += flagged
    tally.docs += len(chunk.texts) - flagged
    return {**chunk.carried, "entities": entities, "error": chunk.errors, "n_windows": windows}
