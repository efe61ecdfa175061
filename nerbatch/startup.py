"""A nerbatch process's start-up and exit, as seen by Python's cyclic garbage collector.

Start-up (importing torch and transformers, building the model) creates several hundred thousand
objects that live as long as the process, and next to no garbage, yet every full collection walks
them all, during the imports, again during the job and once more at exit: 1.1 to 1.7 s of a whole
`nerbatch annotate` process on 800 documents (README, Start-up). So the console entry point
(`nerbatch.cli.run`) calls `begin` (collector off); the first model load calls `end` (one
collection, then what exists is frozen, so that no later collection walks it, and the collector is
back on); exit calls
`freeze_for_exit`. Commands that load no model (stats, show, demo) are short and keep the collector
off. Used as a library, nerbatch leaves the collector alone, except that loading a model pauses it
(`collection_paused`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_started_by_cli = False


def begin() -> None:
    """Turn the collector off until `end` (the console entry point, before anything is imported)."""
    global _started_by_cli
    _started_by_cli = True
    gc.disable()


def end() -> None:
    """Start-up is over: collect its garbage once, freeze everything that is left and turn the
    collector on. Does nothing unless `begin` was called."""
    global _started_by_cli
    if _started_by_cli:
        _started_by_cli = False
        # One full collection first: without it, peak RSS grew with the corpus (int8, ten files
        # vs one: 1.10x; with it 1.00x, as with the default collector)
        gc.collect()
        gc.freeze()
        gc.enable()


def freeze_for_exit() -> None:
    """Spare the interpreter's final collection a walk over every object (about 1 s measured); files
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
