"""Python's cyclic garbage collector, tuned for a nerbatch process: start-up, the job, exit.

Start-up (importing torch and transformers, building the model) leaves about 400,000 objects that
live as long as the process, yet every full collection walks them all: during the imports, again
during the job and once more at exit. So the console entry point (`nerbatch.cli.run`) calls `begin`:
young collections go on as usual (they free the imports' short-lived cycles) but full ones are held
back. The first model load calls `end`: what exists is frozen, so that no later collection walks it,
and the thresholds come back. The annotate job then collects once per chunk instead
(`collections_per_chunk` around the job, `after_chunk` after each chunk), and exit calls
`freeze_for_exit`. Used as a library, nerbatch leaves the collector alone, except that loading a
model pauses it (`collection_paused`). Measurements: benchmarks/README.md.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# A full-collection threshold that start-up never reaches (it counts middle-generation collections).
_NO_FULL_COLLECTIONS = 1_000_000_000
_thresholds: tuple[int, int, int] | None = None  # the ones `begin` replaced
_owned = False  # `begin` was called: this process is nerbatch's console command, its collector is ours
FULL_EVERY = 64  # chunks between full collections in `collections_per_chunk`
_chunks: int | None = None  # chunks collected after, inside `collections_per_chunk`; None outside


def begin() -> None:
    """Hold back full collections until `end` (the console entry point, before anything is imported).

    Where the collector ignores the third threshold (3.14's incremental collector, free-threaded
    builds) this holds nothing back and start-up is as with the default collector; the rest works."""
    global _thresholds, _owned
    _owned = True
    if _thresholds is not None:  # already begun: keep the thresholds to restore
        return
    _thresholds = gc.get_threshold()
    young, middle, _ = _thresholds
    gc.set_threshold(young, middle, _NO_FULL_COLLECTIONS)


def end() -> None:
    """Start-up is over: freeze everything that exists and restore the thresholds. Does nothing
    unless `begin` was called.

    The young collections have already freed start-up's garbage, so nothing needs collecting here
    (turning the collector off instead would leave garbage that must be collected before the
    freeze, a walk over every object, or kept, and peak RSS would grow with the corpus).
    """
    global _thresholds
    if _thresholds is not None:
        gc.freeze()
        gc.set_threshold(*_thresholds)
        _thresholds = None


@contextmanager
def collections_per_chunk() -> Iterator[None]:
    """Within a job of nerbatch's console command: no automatic collections; `after_chunk` collects
    what the last chunk left (a young collection), and everything every `FULL_EVERY` calls.

    A chunk allocates some 100,000 tracked objects (subword offsets, lists, spans) that reference
    counting frees by itself, yet they set off automatic collections, full ones included; one
    collection per chunk costs less and still frees any cycle a chunk makes, so memory stays flat.
    Outside the console command (nerbatch used as a library) the collector is left alone."""
    global _chunks
    if not _owned:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    _chunks = 0
    try:
        yield
    finally:
        _chunks = None
        if enabled:
            gc.enable()


def after_chunk() -> None:
    """Collect what the chunk just finished left, inside `collections_per_chunk`; else nothing."""
    global _chunks
    if _chunks is None:
        return
    _chunks += 1
    gc.collect(2 if _chunks % FULL_EVERY == 0 else 1)


def freeze_for_exit() -> None:
    """Spare the interpreter's final collection a walk over every object; files
    are still closed and flushed by the normal shutdown, and the memory goes back with the process."""
    gc.freeze()


@contextmanager
def collection_paused() -> Iterator[None]:
    """The collector off for the duration (loading a model), then back in its previous state."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
