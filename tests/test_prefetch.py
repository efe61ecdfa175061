"""`nerbatch.prefetch`: the background producer keeps order, re-raises and stops with its consumer."""

from __future__ import annotations

import threading
import time

import pytest

from nerbatch.prefetch import prefetch


def test_prefetch_yields_in_order_and_reraises_the_producers_error():
    assert list(prefetch(iter(range(20)), depth=3)) == list(range(20))

    def failing():
        yield 1
        raise KeyError("row 7")

    seen = []
    with pytest.raises(KeyError, match="row 7"):
        for item in prefetch(failing()):
            seen.append(item)
    assert seen == [1]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    before = threading.active_count()
    items = prefetch(endless(), depth=2)
    assert next(items) == 0
    items.close()  # what a `break` or an exception in the consumer does
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before and len(produced) < 10
