"""The annotate job's options and the choices they take: plain data, cheap to import (the command
line reads its defaults here without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

# How subword predictions become spans, as in the transformers pipeline (see nerbatch.spans).
AGGREGATIONS = ("first", "simple", "average", "max")
# How a text is cut before windowing (see nerbatch.inference): `sentences` runs each sentence as its
# own window(s); `none` covers the whole text with overlapping windows; `both` runs the two and
# averages their probabilities (about twice the compute, more accurate).
SEGMENTS = ("sentences", "none", "both")
# Numeric precision of inference (see nerbatch.precision).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(kw_only=True)
class Options:
    """Everything the command line decides; the output-relevant part goes into config.json.

    Each default is defined here once; `nerbatch.cli` reads its defaults from this class.
    """

    model: str
    inputs: list[str]
    output: str  # a directory path or URI
    text_column: str = "text"
    id_column: str | None = None
    aggregation: str = "first"
    max_length: int | None = None  # None: a document model's window; `both`: 128 (running text); else the limit
    stride: int | None = None  # None: a quarter of a window
    segment: str | None = None  # None: follow how the model was trained (see nerbatch.inference)
    max_segment: int | None = None  # sentence view: cut longer segments; None: the model's record, 0: no cap
    precision: str = "auto"  # fp16 on a GPU, fp32 on CPU; int8 on request (CPU)
    batch_size: int | None = None  # None: inference.CPU_BATCH_WINDOWS or GPU_BATCH_WINDOWS
    max_batch_tokens: int | None = None  # None: inference.CPU_BATCH_TOKENS or GPU_BATCH_TOKENS
    read_rows: int = 512
    keep_columns: list[str] = field(default_factory=list)  # input columns copied to the output, types kept
    partition_by: str | None = None  # an input column: Hive-style COLUMN=value/ directories
    row_group_rows: int = 100_000  # rows per output row group (each file's last may be smaller)
    file_rows: int = 1_000_000  # about this many rows per output file (whole units; see nerbatch.assemble)
    overwrite: bool = False
    progress: bool = True

    @property
    def carried(self) -> list[str]:
        """Input columns copied to the output rows: the id, the kept columns, the partition column."""
        named = ([self.id_column] if self.id_column else []) + self.keep_columns
        if self.partition_by:
            named.append(self.partition_by)
        return list(dict.fromkeys(named))

    @property
    def columns(self) -> list[str]:
        """The input columns the job reads: the text and the carried columns."""
        return [self.text_column] + [c for c in self.carried if c != self.text_column]
