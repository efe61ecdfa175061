"""Reading labelled corpora: CoNLL files, Parquet / JSON Lines, or a dataset on the hub.

Every reader returns a `Corpus`: a list of `Sentence` records (words, IOB2 tags and where they came
from, so that errors can name a file and line) plus the label names the source declares, if any.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nerbatch.errors import NerbatchError

DOCSTART = "-DOCSTART-"
TABULAR_SUFFIXES = {".parquet", ".jsonl", ".json"}

# CoNLL-2003 on the hub as Parquet files (the canonical `conll2003` is a loading script, which
# datasets >= 4 refuses to run). docs/training.md says why this copy.
CONLL2003_HUB = "lhoestq/conll2003"
CONLL2003_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
CONLL2003_SENTENCES = {"train": 14041, "validation": 3250, "test": 3453}  # without -DOCSTART- lines
_CONLL2003_NAME = re.compile(r"conll[-_ ]?(2003|03)", re.IGNORECASE)


class DataError(NerbatchError):
    """Bad input data; the message names the file (and line or row) at fault."""


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    source: str  # a file path or "dataset[split]", for error messages
    line: int | None = None  # CoNLL: line of the first word (one word per line)
    row: int | None = None  # tabular and hub sources: row index
    document: int | None = None  # index of its document; None when the source keeps no boundaries

    def where(self, word: int = 0) -> str:
        """Name the location of word `word` of this sentence, e.g. `valid.txt:1042`."""
        if self.line is not None:
            return f"{self.source}:{self.line + word}"
        return f"{self.source}: row {self.row}, word {word}"


@dataclass
class Corpus:
    sentences: list[Sentence]
    label_names: list[str] | None = None  # declared by the source (ClassLabel), else None
    documents: int = 0
    name: str = ""
    has_documents: bool = False  # True when every sentence knows its document (`Sentence.document`)
    warnings: list[str] = field(default_factory=list)  # for the user: how this copy differs from the expected

    def __len__(self) -> int:
        return len(self.sentences)

    def no_documents_reason(self) -> str:
        """Why this corpus cannot be scored or trained document by document (for error messages)."""
        if self.name.endswith("]"):  # a hub dataset: the CoNLL-2003 copies drop -DOCSTART- lines
            return (
                f"{self.name} keeps no document boundaries (CoNLL-2003 on the hub drops the -DOCSTART- lines); "
                "pass the original CoNLL files, or Parquet/JSON Lines with a document-id column"
            )
        if Path(self.name).suffix in TABULAR_SUFFIXES:
            return f"{self.name}: no document boundaries; name the document-id column (--document-column)"
        return (
            f"{self.name}: no {DOCSTART} line, so no document boundaries; add {DOCSTART} lines before "
            "each document (a whole file is not taken as one document: it is often a bag of sentences)"
        )


@dataclass
class CorpusStats:
    sentences: int
    documents: int
    tokens: int
    entities: dict[str, int] = field(default_factory=dict)


def load_corpus(
    spec: str,
    split: str = "train",
    tokens_column: str = "tokens",
    tags_column: str = "ner_tags",
    document_column: str | None = None,
) -> Corpus:
    """Load a labelled corpus from a local file (CoNLL, Parquet, JSON Lines) or a hub dataset.

    `spec` is a file when one exists at that path; otherwise it is a dataset for `datasets.load_dataset`:
    a hub id or a local copy of a hub dataset (a directory of Parquet files), written
    `name[@revision][:split]` (e.g. `lhoestq/conll2003:test`, `eriktks/conll2003@refs/convert/parquet`).
    Documents come from `-DOCSTART-` lines (CoNLL), `-DOCSTART-` rows (tabular and hub data that keep
    them) or `document_column` (tabular data). A corpus that names itself CoNLL-2003 is checked
    against the published split sizes and labels (`Corpus.warnings`).
    """
    path = Path(spec)
    if path.is_dir() and not any(p.suffix in TABULAR_SUFFIXES for p in path.rglob("*")):
        raise DataError(
            f"{spec}: is a directory without Parquet or JSON Lines files; pass one CoNLL, Parquet or JSON "
            "Lines file, or a directory holding a downloaded copy of a hub dataset"
        )
    if path.is_file():
        if path.suffix in TABULAR_SUFFIXES:
            corpus = read_tabular(path, tokens_column, tags_column, document_column)
        else:
            corpus = read_conll(path)
    elif path.suffix in TABULAR_SUFFIXES | {".txt", ".conll"}:
        raise DataError(f"{spec}: no such file")
    else:
        name, revision, explicit_split = parse_dataset_spec(spec)
        if document_column:
            raise DataError(f"{spec}: --document-column applies to Parquet/JSON Lines files, not hub datasets")
        split = explicit_split or split
        corpus = read_hub(name, split, tokens_column, tags_column, revision)
    if not corpus.sentences:  # found only after a whole epoch otherwise, or as a model with a random head
        raise DataError(f"{corpus.name}: no sentences (an empty file, or only {DOCSTART} lines)")
    if looks_like_conll2003(spec):
        corpus.warnings += conll2003_differences(corpus, split if not path.is_file() else None)
    return corpus


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split `name[@revision][:split]` into its parts (None where absent)."""
    rest, _, split = spec.partition(":")
    name, _, revision = rest.partition("@")
    return name, revision or None, split or None


def looks_like_conll2003(spec: str) -> bool:
    """Whether a corpus spec names CoNLL-2003: a dataset (hub id or directory) named after it, or a
    file in a directory named after it (`conll2003/valid.txt`) or named so itself."""
    path = Path(spec)
    parts = path.parts[-2:] if path.is_file() else [Path(parse_dataset_spec(spec)[0]).name]
    return any(_CONLL2003_NAME.search(part) for part in parts)


def conll2003_differences(corpus: Corpus, split: str | None) -> list[str]:
    """How a corpus that names itself CoNLL-2003 differs from the published dataset: its sentence
    count for `split` (any split's count when None: a local file's role is not its split), and its
    label names (their order too, when the source declares ids). Empty when it matches."""
    found = []
    expected = [CONLL2003_SENTENCES[split]] if split in CONLL2003_SENTENCES else list(CONLL2003_SENTENCES.values())
    if len(corpus) not in expected:
        sizes = " / ".join(f"{n:,} ({s})" for s, n in CONLL2003_SENTENCES.items())
        found.append(f"{len(corpus):,} sentences where CoNLL-2003 has {sizes}")
    if corpus.label_names is not None and list(corpus.label_names) != CONLL2003_LABELS:
        found.append(
            f"labels {list(corpus.label_names)} where CoNLL-2003 has {CONLL2003_LABELS} (a model trained on it "
            "has other label ids than one trained on the canonical copies)"
        )
    elif corpus.label_names is None:  # tags as strings: compare the entity types seen
        types = {t[2:] for s in corpus.sentences for t in s.tags if t != "O"}
        if types != {"PER", "ORG", "LOC", "MISC"}:
            found.append(f"entity types {sorted(types)} where CoNLL-2003 has ['LOC', 'MISC', 'ORG', 'PER']")
    return [f"{corpus.name}: {text}; check that this is the copy you mean" for text in found]


def read_conll(path: str | Path) -> Corpus:
    """Read a CoNLL file: `word ... tag` per line (4-column or 2-column), blank line between sentences.

    `-DOCSTART-` lines start a new document. IOB1 tags are converted to IOB2. Every word line has
    as many columns as the first: a line that lost a column would otherwise read its chunk tag as
    the entity tag.
    """
    path = Path(path)
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    start_line = 0
    documents = 0  # -DOCSTART- lines seen
    current = 0  # document index of the next sentence

    def flush() -> None:
        if words:
            sentences.append(Sentence(words.copy(), to_iob2(tags), str(path), line=start_line, document=current))
            words.clear()
            tags.clear()

    columns = (0, 0)  # the column count of the first word line, and that line
    for lineno, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        try:
            fields = split_fields(line)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
        if not fields:
            flush()
            continue
        if fields[0] == DOCSTART:
            flush()
            documents += 1
            if sentences and sentences[-1].document == current:  # an empty document takes no index
                current += 1
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{lineno}: expected 'word ... tag', got {line.rstrip()!r}")
        if not columns[0]:
            columns = (len(fields), lineno)
        elif len(fields) != columns[0]:
            raise DataError(
                f"{path}:{lineno}: {len(fields)} columns ({line.rstrip()!r}) where line {columns[1]} has "
                f"{columns[0]}; every word line needs the same columns, the entity tag last"
            )
        if not words:
            start_line = lineno
        words.append(fields[0])
        tags.append(fields[-1])
    flush()
    if not documents:
        for sentence in sentences:
            sentence.document = None
    return Corpus(sentences, None, documents or 1, str(path), has_documents=bool(documents))


def read_text(path: Path) -> str:
    """The whole file as text: UTF-8, with or without a byte-order mark (a BOM left in would turn
    the first `-DOCSTART-` into a word); other encodings are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def split_fields(line: str) -> list[str]:
    """The columns of a CoNLL line, split on ASCII spaces and tabs only: `str.split()` would also
    split a word at a no-break or ideographic space and silently keep only its first part.

    A line with tabs is split on tabs alone; a space inside one of its fields is a `ValueError`
    (read as a separator, it would move the rest of the word into the tag columns)."""
    line = line.rstrip("\r\n")
    if "\t" not in line:
        return [field for field in line.split(" ") if field]
    fields = [field.strip(" ") for field in line.split("\t")]
    spaced = next((field for field in fields if " " in field), None)
    if spaced is not None:
        raise ValueError(f"the tab-separated field {spaced!r} holds a space; a CoNLL word cannot contain one")
    while fields and not fields[-1]:  # trailing tabs; an empty middle column still counts as one
        fields.pop()
    return fields


def read_tabular(path: Path, tokens_column: str, tags_column: str, document_column: str | None = None) -> Corpus:
    """Read Parquet or JSON Lines rows holding a list of words and a list of tags (ids or strings).

    With `document_column`, rows with the same value form one document, in row order (its rows need
    not be contiguous); a missing or null value is an error naming the row.
    """
    import pyarrow.parquet as pq

    label_names = None
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        label_names = _classlabel_names(table.schema.metadata, tags_column)
        rows = table.to_pylist()
    else:
        rows = read_json_lines(path)
    sentences = []
    document_index: dict = {}
    columns = (tokens_column, tags_column) + ((document_column,) if document_column else ())
    for i, row in enumerate(rows):
        for column in columns:
            if column not in row:
                raise DataError(f"{path}: row {i}: missing column {column!r} (columns: {sorted(row)})")
        words, tags = row[tokens_column], row[tags_column]
        if tags and isinstance(tags[0], int):
            if label_names is None:
                raise DataError(
                    f"{path}: column {tags_column!r} holds integer ids but the file declares no "
                    "label names (write tag strings, or Parquet saved by `datasets` with a ClassLabel)"
                )
            tags = names_of(tags, label_names, f"{path}: row {i}")
        sentence = _checked_sentence(words, tags, str(path), i)
        if document_column:
            key = row[document_column]
            if key is None:
                raise DataError(f"{path}: row {i}: null in document column {document_column!r}")
            if isinstance(key, (list, dict)):
                raise DataError(
                    f"{path}: row {i}: document column {document_column!r} holds a "
                    f"{type(key).__name__}; it must be a string or a number"
                )
            sentence.document = document_index.setdefault(key, len(document_index))
        sentences.append(sentence)
    if document_column:
        sentences.sort(key=lambda s: s.document)  # stable: row order within each document
        return Corpus(sentences, label_names, len(document_index), str(path), has_documents=True)
    return _split_at_docstart_rows(Corpus(sentences, label_names, 1, str(path)))


def read_json_lines(path: Path) -> list:
    """The rows of a JSON Lines file (blank lines skipped); a bad line is an error naming it."""
    rows = []
    # not str.splitlines: JSON strings may hold U+2028 and other characters it splits at
    for lineno, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not a JSON value ({exc.msg} at column {exc.colno})") from None
    return rows


def read_hub(name: str, split: str, tokens_column: str, tags_column: str, revision: str | None = None) -> Corpus:
    """Read one split of a dataset through `datasets.load_dataset`: a hub id at an optional revision
    (branch, tag or commit), or a local directory laid out like a hub dataset (Parquet files)."""
    import datasets

    where = f"{name}@{revision}" if revision else name
    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as exc:  # the hub raises many types; the user needs one clear message
        raise DataError(hub_error_message(where, split, exc)) from exc
    feature = ds.features.get(tags_column)
    label_names = getattr(getattr(feature, "feature", None), "names", None)
    for column in (tokens_column, tags_column):
        if column not in ds.column_names:
            raise DataError(f"{where}[{split}]: no column {column!r} (columns: {ds.column_names})")
    sentences = []
    for i, row in enumerate(ds):
        tags = row[tags_column]
        if label_names is not None:
            tags = names_of(tags, label_names, f"{where}[{split}]: row {i}")
        sentences.append(_checked_sentence(row[tokens_column], tags, f"{where}[{split}]", i))
    return _split_at_docstart_rows(Corpus(sentences, label_names, 1, f"{where}[{split}]"))


def hub_error_message(where: str, split: str, exc: Exception) -> str:
    """One line for a failed `load_dataset`: what went wrong and what to pass instead."""
    detail = " ".join(str(exc).split())
    if "Dataset scripts are no longer supported" in detail:
        return (
            f"{where} is a dataset loading script, which datasets >= 4 no longer runs; pass a copy stored as "
            f"data files instead: its Parquet conversion ({where.partition('@')[0]}@refs/convert/parquet) if the "
            f"hub made one, for CoNLL-2003 {CONLL2003_HUB}, or local CoNLL/Parquet/JSON Lines files"
        )
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    if offline or isinstance(exc, ConnectionError) or "connect" in detail.lower():
        return (
            f"could not load dataset {where!r} split {split!r}: the hub is not reachable "
            f"{'(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)' if offline else f'({detail})'}; "
            "pass local CoNLL/Parquet/JSON Lines files or a downloaded copy of the dataset (a directory)"
        )
    return f"could not load dataset {where!r} split {split!r}: {detail}"


def _split_at_docstart_rows(corpus: Corpus) -> Corpus:
    """Rows holding the single word `-DOCSTART-` (kept by some copies of CoNLL) mark documents:
    number the sentences by document and drop those rows, which are not sentences."""
    if not any(s.words == [DOCSTART] for s in corpus.sentences):
        return corpus
    sentences, current, documents = [], 0, 0
    for sentence in corpus.sentences:
        if sentence.words == [DOCSTART]:
            documents += 1
            if sentences and sentences[-1].document == current:
                current += 1
            continue
        sentence.document = current
        sentences.append(sentence)
    return Corpus(sentences, corpus.label_names, documents, corpus.name, has_documents=True)


def names_of(ids: list[int], names: list[str], where: str) -> list[str]:
    """Tag names of integer ids; an id outside the label list (e.g. -100) is an error, not a wrap-around."""
    bad = [t for t in ids if not 0 <= t < len(names)]
    if bad:
        raise DataError(f"{where}: tag id {bad[0]} is not one of the {len(names)} labels {names}")
    return [names[t] for t in ids]


def _checked_sentence(words, tags, source: str, row: int) -> Sentence:
    if len(words) != len(tags):
        raise DataError(f"{source}: row {row}: {len(words)} words but {len(tags)} tags")
    if any(w is None or t is None for w, t in zip(words, tags)):
        raise DataError(f"{source}: row {row}: a null word or tag")
    return Sentence([str(w) for w in words], to_iob2([str(t) for t in tags]), source, row=row)


def _classlabel_names(metadata: dict | None, column: str) -> list[str] | None:
    """Label names that `datasets` stores in Parquet schema metadata for a Sequence(ClassLabel) column."""
    if not metadata or b"huggingface" not in metadata:
        return None
    features = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {})
    feature = features.get(column, {})
    inner = feature.get("feature", feature)
    if isinstance(inner, list):  # datasets writes a plain list for some Sequence features
        inner = inner[0] if inner else {}
    return inner.get("names")


def to_iob2(tags: list[str]) -> list[str]:
    """Convert IOB1 (an entity may open with `I-`) to IOB2 (every entity opens with `B-`).

    A no-op on IOB2 input, so it is applied to every source.
    """
    out = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def build_label_list(corpus: Corpus) -> list[str]:
    """The label list: the source's ClassLabel names, else the tags seen with `O` first.

    Every entity type gets both `B-` and `I-` so that continuation subwords can always be labelled.
    """
    if corpus.label_names:
        return list(corpus.label_names)
    for sentence in corpus.sentences:
        for offset, tag in enumerate(sentence.tags):
            if tag != "O" and (tag[:2] not in ("B-", "I-") or len(tag) == 2):
                raise DataError(
                    f"{sentence.where(offset)}: tag {tag!r} on word {sentence.words[offset]!r} is neither 'O' "
                    "nor an entity type prefixed by 'B-' or 'I-' (IOB1 or IOB2)"
                )
    types = sorted({t[2:] for s in corpus.sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_labels(corpus: Corpus, label2id: dict[str, int]) -> None:
    """Raise a `DataError` naming the file and line of the first tag that is not in the label set."""
    for sentence in corpus.sentences:
        for offset, tag in enumerate(sentence.tags):
            if tag not in label2id:
                raise DataError(
                    f"{sentence.where(offset)}: unknown tag {tag!r} on word {sentence.words[offset]!r}; "
                    f"the training labels are {sorted(label2id)}"
                )


def corpus_stats(corpus: Corpus) -> CorpusStats:
    """Sentence, document, token and entity counts (entities counted by their `B-` tags)."""
    entities: dict[str, int] = {}
    for sentence in corpus.sentences:
        for tag in sentence.tags:
            if tag.startswith("B-"):
                entities[tag[2:]] = entities.get(tag[2:], 0) + 1
    return CorpusStats(len(corpus), corpus.documents, sum(len(s.words) for s in corpus.sentences), entities)
