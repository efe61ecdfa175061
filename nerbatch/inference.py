"""Running a token classifier over raw texts of any length: windows, batched forward, document-level decoding.

A text is tokenized once, whole (fast tokenizer, character offsets, no special tokens). Its subwords
are covered by overlapping windows of the model's length; each window gets the model's special
tokens and goes through the model in length-sorted, token-budgeted batches. Every subword then
takes its prediction from the window where it is most central (furthest from a cut), and the whole
document is decoded once (`nerbatch.spans`), so no entity is cut at a window edge or emitted twice.

What a window holds follows how the model was trained (`SEGMENTS`): a model trained on single
sentences sees one sentence per window (`nerbatch.segment`), a model trained with document context
sees running text in windows of its training length. `nerbatch train` records which in the model's
config (`config.nerbatch`); models without that record (hub checkpoints) are taken as sentence models.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from nerbatch.errors import OptionError
from nerbatch.modeling import ModelError, max_model_length, training_record, window_length
from nerbatch.options import SEGMENTS
from nerbatch.precision import (
    INT8_SCHEME,
    autocast_dtype,
    cast_bf16,
    is_bf16_cast,
    is_quantized,
    quantize_int8,
    resolve_precision,
)
from nerbatch.segment import cap_segments, sentence_bounds
from nerbatch.spans import AGGREGATIONS, Span, decode_spans

LANES_ENV = "NERBATCH_CPU_LANES"
CPU_BATCH_TOKENS = 1024  # padded tokens per forward on CPU: bigger batches don't run faster there
GPU_BATCH_TOKENS = 32768
CPU_BATCH_WINDOWS = 64
# Sentence windows are short (~30 subwords): 64 of them make ~2k-token batches, and a GPU running
# batches that small is bound by launching kernels, not by arithmetic.
GPU_BATCH_WINDOWS = 1024
# `--segment both` on a model trained on single sentences: the running-text view's window. Short
# context windows complement the sentence view best for such models (chosen on the CoNLL-2003
# validation documents).
BOTH_CONTEXT_WINDOW = 128


@dataclass
class Document:
    """One tokenized text: content subwords, their windows, and (after `Tagger.forward`) probabilities.

    The per-subword fields are arrays, not the tokenizer's Python lists: documents wait in the
    read-ahead queue, and lists of Python ints and tuples take several times the memory."""

    offsets: np.ndarray  # (subwords, 2) int32 character offsets into the text
    word_ids: np.ndarray  # (subwords,) int32 word index, -1 for a subword of no word
    ids: np.ndarray  # (subwords,) int32 vocabulary ids
    windows: list[tuple[int, int]]  # content subword ranges [s, e) fed to the model
    keeps: list[tuple[int, int]]  # the part of each window whose predictions are kept
    views: int = 1  # how many window plans cover each subword once (`both`: 2, averaged)
    probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


@dataclass
class InFlight:
    """Batches launched by `Tagger.launch`, each with its pending probabilities."""

    docs: list[Document]
    batches: list[list[tuple[int, int]]]
    results: list[Pending]

    def cancel(self) -> None:
        """Drop the batches that have not started (CPU lanes): a failed unit stops its model work."""
        for pending in self.results:
            if isinstance(pending, LaneBatch):
                pending.future.cancel()


class Pending(Protocol):
    """One batch's probabilities on their way (a GPU's copy back, a model process's reply)."""

    def result(self) -> tuple[np.ndarray, bool]:
        """Wait for the probabilities (windows x width x labels); the flag says the batch overflowed
        in reduced precision and was run again in fp32."""
        ...


@dataclass
class LocalBatch:
    """A batch launched on this process's model: probabilities in a CPU tensor (on a GPU, still being
    copied back into pinned memory until `copied` fires; None on a CPU)."""

    tagger: Tagger
    ids: torch.Tensor
    mask: torch.Tensor
    probs: torch.Tensor
    copied: torch.cuda.Event | None

    def ready(self) -> bool:
        """Whether `result` would return without waiting for the GPU."""
        return self.copied is None or self.copied.query()

    def result(self) -> tuple[np.ndarray, bool]:
        """The probabilities; a batch that is not all finite (an fp16 overflow) is run again in fp32
        here: checking on the host costs no wait for the GPU."""
        if self.copied is not None:
            self.copied.synchronize()  # this batch's copy back is complete (later ones may still run)
        probs = self.probs.numpy()
        if self.tagger.autocast_dtype is not None and not np.isfinite(probs).all():
            return self.tagger.fp32_probabilities(self.ids, self.mask), True
        return probs, False


@dataclass
class LaneBatch:
    """A batch queued to the CPU lanes (`Tagger.lanes`): its probabilities once a lane has run it."""

    future: Future

    def result(self) -> tuple[np.ndarray, bool]:
        return self.future.result()


def cpu_lanes(device) -> int:
    """How many lanes a process runs its CPU batches in (1 on a GPU): `NERBATCH_CPU_LANES`, else one
    per torch thread. 1 means none: each batch runs in turn, its operations split over the threads."""
    if torch.device(device).type != "cpu":
        return 1
    value = os.environ.get(LANES_ENV)
    if value is None:
        return torch.get_num_threads()
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise OptionError(f"{LANES_ENV}={value!r}: expected a whole number of lanes, at least 1")
    return int(value)


def _one_torch_thread() -> None:
    # Run in each lane as it starts: its own OpenMP team becomes one thread. torch also stores 1 as
    # the process's default for threads that use it later, which `Tagger.close` sets back.
    torch.set_num_threads(1)


def plan_windows(n: int, length: int, stride: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cover `n` subwords with windows of `length` overlapping by at least `stride`.

    Returns the windows and, for each, the range it owns: in an overlap, a subword belongs to the
    window in which it is furthest from the cut (ties go to the earlier window). The last window is
    aligned to the end of the text, so it is full-length too.
    """
    if n == 0:
        return [], []
    starts = [0]
    while starts[-1] + length < n:
        starts.append(min(starts[-1] + length - stride, n - length))
    windows = [(s, min(s + length, n)) for s in starts]
    cuts = [(windows[k][1] - 1 + windows[k + 1][0]) // 2 + 1 for k in range(len(windows) - 1)]
    bounds = [0, *cuts, n]
    return windows, [(bounds[k], bounds[k + 1]) for k in range(len(windows))]


def plan_segment_windows(
    segments: list[tuple[int, int]], length: int, stride: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """`plan_windows` inside each subword range of `segments` (consecutive, covering the text): no
    window crosses a segment boundary, and every subword is kept by exactly one window."""
    windows, keeps = [], []
    for a, b in segments:
        w, k = plan_windows(b - a, length, stride)
        windows += [(s + a, e + a) for s, e in w]
        keeps += [(s + a, e + a) for s, e in k]
    return windows, keeps


def subword_segments(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sentences of `text` as ranges of subword indices (empty sentences dropped)."""
    starts = [start for start, _ in offsets]
    cuts = [bisect_left(starts, a) for a, _ in sentence_bounds(text)] + [len(offsets)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def special_tokens_around(backend) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a single sequence ([CLS] / [SEP])."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k], full[k + len(bare) :]
    raise ModelError("cannot locate the content between the tokenizer's special tokens")


class Tagger:
    """Tags documents with entity spans: a model, its fast tokenizer and the windowing, batching and
    decoding settings (the annotate job, `evaluate --documents` and `predict` all run one)."""

    def __init__(
        self,
        model,
        tokenizer,
        aggregation: str = "first",
        max_length: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        segment: str | None = None,
        precision: str = "auto",
        max_segment: int | None = None,
        lanes: int = 1,
    ):
        if aggregation not in AGGREGATIONS:
            raise OptionError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        from tokenizers import Tokenizer

        record = training_record(model.config)
        document_model = record.get("context") == "document"
        # the segmentation that scored best on validation documents in training, else the model's kind
        self.segment = segment or record.get("segment") or ("none" if document_model else "sentences")
        if self.segment not in SEGMENTS:
            raise OptionError(f"unknown segment {self.segment!r}; choose one of {', '.join(SEGMENTS)}")
        limit = max_model_length(tokenizer, model.config)
        if max_length is None and document_model:
            max_length = min(record.get("window") or limit, limit)  # the window length the model was trained on
        elif max_length is None and self.segment == "both":
            max_length = min(BOTH_CONTEXT_WINDOW, limit)

        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.aggregation = aggregation
        # A private copy of the Rust tokenizer: truncation/padding off, without touching the caller's.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.prefix, self.suffix = special_tokens_around(self.backend)
        self.max_length = window_length(max_length, tokenizer, model.config)
        self.length = self.max_length - len(self.prefix) - len(self.suffix)  # content subwords per window
        if self.length < 2:
            raise OptionError(f"max_length {self.max_length} leaves no room for text after special tokens")
        self.stride = self.length // 4 if stride is None else stride
        if not 0 <= self.stride <= self.length // 2:
            raise OptionError(
                f"stride {self.stride} must be between 0 and half a window ({self.length // 2} "
                f"subwords with max_length {self.max_length}): it is the overlap between windows"
            )
        # `both`: max_length sizes the running-text view; the sentence view keeps whole sentences up
        # to the model's limit, exactly as `sentences` alone would
        self.sentence_length = limit - len(self.prefix) - len(self.suffix) if self.segment == "both" else self.length
        on_gpu = self.device.type == "cuda"
        self.batch_size = batch_size if batch_size is not None else GPU_BATCH_WINDOWS if on_gpu else CPU_BATCH_WINDOWS
        self.max_batch_tokens = max_batch_tokens or (GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "int8" and not is_quantized(model):
            self.model = model = quantize_int8(model, tokenizer)
        if self.precision == "bf16" and self.device.type == "cpu" and not is_bf16_cast(model):
            self.model = model = cast_bf16(model)
        self.autocast_dtype = autocast_dtype(self.precision, self.device.type)
        self.choice = None  # the `nerbatch.autoprecision.Choice` behind `precision`, where one was made
        # sentence view: segments longer than this many subwords are cut (nerbatch.segment.cap_segments);
        # by default the length the model was trained on (recorded by `nerbatch train`), else no cap
        self.max_segment = record.get("max_segment") if max_segment is None else (max_segment or None)
        if self.segment == "none":
            self.max_segment = None
        self.fp32_batches = 0  # batches whose autocast outputs were not finite, run again in fp32
        # CPU lanes: `lanes` threads, each running whole batches on one torch thread. The model's
        # small matrix products and the quantization passes around int8 ones split poorly over
        # cores; batches side by side keep every core busy, and `launch` returns at once, so the
        # caller decodes one chunk while the lanes run the next. The probabilities are the same.
        self.lane_count = lanes if lanes > 1 and self.device.type == "cpu" else 1
        self.lanes = None
        if self.lane_count > 1:
            self.threads = torch.get_num_threads()  # this thread's count, fixed before the lanes change the default
            self.lanes = ThreadPoolExecutor(lanes, thread_name_prefix="nerbatch-lane", initializer=_one_torch_thread)

    def settings(self) -> dict:
        """The options that determine the output (for run configs and Parquet metadata)."""
        settings = {
            "aggregation": self.aggregation,
            "max_length": self.max_length,
            "stride": self.stride,
            "segment": self.segment,
            "precision": self.precision,
        }
        if self.max_segment:  # only where a cap applies: outputs without one resume as before
            settings["max_segment"] = self.max_segment
        if self.precision == "int8":  # which int8: a resume must not mix two schemes in one output
            settings["int8"] = INT8_SCHEME
        return settings

    def encode(self, texts: list[str]) -> list[Document]:
        """Tokenize texts in one batched call and plan their windows (safe to run in another thread)."""
        docs = []
        for text, enc in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False)):
            # each read of an Encoding attribute builds a new Python list: read each once
            offsets, word_ids, ids = enc.offsets, enc.word_ids, enc.ids
            windows, keeps = [], []
            views = ("sentences", "none") if self.segment == "both" else (self.segment,)
            for view in views:
                if view == "sentences":
                    segments = subword_segments(text, offsets)
                    if self.max_segment:
                        segments = cap_segments(text, offsets, segments, self.max_segment)
                else:
                    segments = [(0, len(ids))] if ids else []
                if view == "sentences" and self.segment == "both":
                    planned = plan_segment_windows(segments, self.sentence_length, self.sentence_length // 4)
                else:
                    planned = plan_segment_windows(segments, self.length, self.stride)
                windows += planned[0]
                keeps += planned[1]
            docs.append(
                Document(_int32(offsets).reshape(-1, 2), _word_array(word_ids), _int32(ids), windows, keeps, len(views))
            )
        return docs

    def batches(self, docs: list[Document]) -> list[list[tuple[int, int]]]:
        """Group all windows (doc index, window index) into length-sorted, token-budgeted batches."""
        order = sorted(
            ((d, k) for d, doc in enumerate(docs) for k in range(len(doc.windows))),
            key=lambda dk: -_width(docs[dk[0]].windows[dk[1]]),
        )
        batches, current, widest = [], [], 0
        extra = len(self.prefix) + len(self.suffix)
        for d, k in order:
            width = _width(docs[d].windows[k]) + extra
            widest = max(widest, width)
            if current and (len(current) >= self.batch_size or (len(current) + 1) * widest > self.max_batch_tokens):
                batches.append(current)
                current, widest = [], width
            current.append((d, k))
        if current:
            batches.append(current)
        return batches

    def forward(self, docs: list[Document]) -> None:
        """Run the model on every window and store each document's kept probabilities in `doc.probs`."""
        self.collect(self.launch(docs))

    @torch.inference_mode()
    def launch(self, docs: list[Document]) -> InFlight:
        """Start the model on every window of `docs`; `collect` waits for the results.

        On a GPU every batch is queued before any result is read back, and the caller may decode
        the previous chunk while these run (`nerbatch.job` does): the GPU never waits for the
        CPU's span decoding. On a CPU with lanes the batches are queued to them in the same way;
        without, the passes simply run here, in turn."""
        batches = self.batches(docs)
        if self.lanes is None:
            return InFlight(docs, batches, [self.run_batch(*self._tensors(docs, batch)) for batch in batches])
        flight = InFlight(docs, batches, [])
        try:
            for batch in batches:
                flight.results.append(LaneBatch(self.lanes.submit(self._lane, *self._tensors(docs, batch))))
        except BaseException:  # e.g. SIGTERM while queuing: what was queued is nobody's, so drop it
            flight.cancel()
            raise
        return flight

    def _lane(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, bool]:
        return self.run_batch(ids, mask).result()

    def close(self) -> None:
        """Stop the CPU lanes (dropping queued batches) and give the process its torch threads back."""
        if self.lanes is not None:
            self.lanes.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(self.threads)
            self.lanes, self.lane_count = None, 1

    def collect(self, flight: InFlight) -> int:
        """Wait for a launch's results and store each document's kept probabilities in `doc.probs`.

        Returns how many batches overflowed in reduced precision and ran again in fp32 (also added
        to `fp32_batches`)."""
        reruns = 0
        for doc in flight.docs:
            doc.probs = np.zeros((doc.n_tokens, len(self.labels)), dtype=np.float32)
        for batch, pending in zip(flight.batches, flight.results):
            probs, rerun = pending.result()
            reruns += rerun
            for i, (d, k) in enumerate(batch):
                doc = flight.docs[d]
                (s, _), (a, b) = doc.windows[k], doc.keeps[k]
                first = len(self.prefix) + a - s
                if doc.views == 1:  # each subword is kept by exactly one window
                    doc.probs[a:b] = probs[i, first : first + b - a]
                else:
                    doc.probs[a:b] += probs[i, first : first + b - a] / doc.views
        self.fp32_batches += reruns
        return reruns

    def _tensors(self, docs: list[Document], batch: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded input ids and attention mask of one batch of windows."""
        front, back = len(self.prefix), len(self.suffix)
        width = front + max(_width(docs[d].windows[k]) for d, k in batch) + back
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, (d, k) in enumerate(batch):
            s, e = docs[d].windows[k]
            end = front + e - s
            ids[i, :front] = self.prefix
            ids[i, front:end] = docs[d].ids[s:e]
            ids[i, end : end + back] = self.suffix
            mask[i, : end + back] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    @torch.inference_mode()
    def run_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> Pending:
        """Start the model on one padded batch (CPU tensors). On a GPU the copy back of the softmax
        probabilities is only started."""
        if self.device.type != "cuda":
            return LocalBatch(self, ids, mask, torch.softmax(self._logits(ids, mask).float(), dim=-1), None)
        on_device = (t.pin_memory().to(self.device, non_blocking=True) for t in (ids, mask))
        probs = torch.softmax(self._logits(*on_device).float(), dim=-1)
        host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        host.copy_(probs, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))  # the model's device, not the current one
        return LocalBatch(self, ids, mask, host, copied)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.model(input_ids=ids, attention_mask=mask).logits

    @torch.inference_mode()
    def fp32_probabilities(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """One batch's probabilities in fp32, waited for. Autocast is turned off explicitly: the
        caller's (a training loop's mixed precision, a user's own block) would otherwise apply."""
        with torch.autocast(self.device.type, enabled=False):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        probs = torch.softmax(logits, dim=-1).cpu().numpy()
        if not np.isfinite(probs).all():
            raise ModelError(
                f"the model's outputs are not finite even in fp32 (a batch of {len(ids)} windows): "
                "its weights may hold NaN or inf"
            )
        return probs

    def decode(self, doc: Document, text: str) -> list[Span]:
        """The entity spans of one document whose probabilities `forward` has filled."""
        if doc.n_tokens == 0:
            return []
        best = doc.probs.argmax(axis=1)
        scores = doc.probs[np.arange(len(best)), best]
        probs = doc.probs if self.aggregation == "average" else None
        word_ids = doc.word_ids.tolist()
        if doc.word_ids.min() < 0:
            word_ids = [None if w < 0 else w for w in word_ids]
        return decode_spans(
            text, doc.offsets.tolist(), word_ids, best.tolist(), scores.tolist(), self.labels, self.aggregation, probs
        )

    def annotate(self, texts: list[str]) -> list[list[Span]]:
        """Entity spans for each text (in memory; the batch job streams with `encode`/`forward`/`decode`)."""
        docs = self.encode(texts)
        self.forward(docs)
        return [self.decode(doc, text) for doc, text in zip(docs, texts)]


def _width(window: tuple[int, int]) -> int:
    return window[1] - window[0]


def _int32(values: list) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def _word_array(word_ids: list[int | None]) -> np.ndarray:
    """Word ids as int32, -1 for None (a subword of no word: rare without special tokens)."""
    try:
        return _int32(word_ids)
    except TypeError:
        return _int32([-1 if w is None else w for w in word_ids])


def tag_texts(texts: list[str], model, tokenizer, **options) -> list[list[Span]]:
    """Entity spans for each of `texts`, of any length, with a token-classification model.

    `options` are the `Tagger`'s (aggregation, max_length, stride, batch_size, segment, precision);
    `segment` and `max_length` default to how the model was trained (see the module docstring),
    `stride` (overlap between windows, in subwords) to a quarter of a window. Offsets are Python
    string indices into each text.
    """
    return Tagger(model, tokenizer, **options).annotate(list(texts))


# The names of nerbatch 0.3, for callers that imported them.
Annotator = Tagger
annotate_texts = tag_texts
