"""Windowed inference: pipeline parity, window planning, document-level merging, very long documents."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForTokenClassification, BertConfig, BertForTokenClassification, pipeline

from nerbatch.demo import DEMO_DATA
from nerbatch.errors import OptionError
from nerbatch.inference import Tagger, plan_windows, tag_texts
from nerbatch.modeling import load_tokenizer

from conftest import CONLL_LABELS, REUTERS, need
from models import tiny_bert


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForTokenClassification.from_pretrained(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module", params=["cased-wordpiece", "uncased-wordpiece"])
def random_model(request, tiny_model_dir):
    """A random tiny BERT (labels all over the place, so many spans) with the tiny cased tokenizer or
    MiniLM's uncased one (lowercases and strips accents, splits Hangul into jamo)."""
    if request.param == "cased-wordpiece":
        return request.getfixturevalue("tiny")
    tokenizer = load_tokenizer(str(request.getfixturevalue("minilm_dir")))
    return tiny_bert(tokenizer.vocab_size, max_positions=512).eval(), tokenizer


@pytest.fixture(scope="module")
def tuned(tuned_model_dir):
    return AutoModelForTokenClassification.from_pretrained(tuned_model_dir).eval(), load_tokenizer(str(tuned_model_dir))


@pytest.fixture(scope="module")
def reuters_texts() -> list[str]:
    texts = pq.read_table(need(REUTERS), columns=["text"]).column("text").to_pylist()
    return [t for t in texts[:3000] if t]


@pytest.mark.slow
@pytest.mark.parametrize(("aggregation", "docs"), [("simple", 210), ("first", 60), ("average", 60), ("max", 60)])
def test_matches_the_transformers_pipeline_on_reuters(tuned, reuters_texts, aggregation, docs):
    model, tokenizer = tuned
    lengths = [len(ids) for ids in tokenizer(reuters_texts[:800])["input_ids"]]
    fitting = [t for t, n in zip(reuters_texts, lengths) if n <= tokenizer.model_max_length][:docs]
    assert len(fitting) == docs
    ours = tag_texts(fitting, model, tokenizer, aggregation=aggregation, segment="none")  # one window each
    pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation)
    entities = 0
    for text, mine in zip(fitting, ours):
        theirs = pipe(text)
        assert [(s.start, s.end, s.label) for s in mine] == [(e["start"], e["end"], e["entity_group"]) for e in theirs]
        assert [s.score for s in mine] == pytest.approx([float(e["score"]) for e in theirs], abs=1e-4)
        entities += len(mine)
    assert entities > 2 * docs  # the comparison is not vacuous


def test_plan_windows_covers_every_subword_once_from_its_most_central_window():
    for n in [1, 5, 16, 17, 40, 100, 1001]:
        for length, stride in [(16, 0), (16, 4), (16, 8), (10, 3)]:
            windows, keeps = plan_windows(n, length, stride)
            assert keeps[0][0] == 0 and keeps[-1][1] == n
            assert all(keeps[k][1] == keeps[k + 1][0] for k in range(len(keeps) - 1))
            for (s, e), (a, b) in zip(windows, keeps):
                assert e - s == min(length, n) and s <= a <= b <= e
            for k in range(len(windows) - 1):
                assert windows[k + 1][0] <= windows[k][1] - stride  # overlap at least `stride`
                for p in range(*keeps[k + 1]):  # owned by the later window: not closer to its edge there
                    if p < windows[k][1]:
                        assert p - windows[k + 1][0] > windows[k][1] - 1 - p
    assert plan_windows(0, 16, 4) == ([], [])


def context_free_model(vocab_size: int) -> BertForTokenClassification:
    """A BERT with no layers and zero position embeddings: each subword's logits depend on its id only."""
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=0,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8192,
        num_labels=len(CONLL_LABELS),
        id2label=dict(enumerate(CONLL_LABELS)),
        label2id={x: i for i, x in enumerate(CONLL_LABELS)},
    )
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.zero_()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("segment", ["none", "sentences", "both"])
@pytest.mark.parametrize("aggregation", ["first", "simple"])
def test_windows_merge_exactly_when_predictions_do_not_depend_on_context(tiny, reuters_texts, aggregation, segment):
    """With a context-free model, any window layout must give exactly the entities of one huge window:
    nothing lost, cut or duplicated at a window edge or a sentence boundary."""
    _, tokenizer = tiny
    model = context_free_model(tokenizer.vocab_size)
    tokenizer.model_max_length = 8192
    try:
        texts = [" ".join(reuters_texts[:30]), reuters_texts[3]]
        whole = tag_texts(texts, model, tokenizer, aggregation=aggregation, max_length=8192, segment="none")
        assert sum(map(len, whole)) > 200
        for max_length, stride in [(16, 0), (16, 7), (64, 16), (130, 64)]:
            assert (
                tag_texts(
                    texts,
                    model,
                    tokenizer,
                    aggregation=aggregation,
                    max_length=max_length,
                    stride=stride,
                    segment=segment,
                )
                == whole
            )
    finally:
        tokenizer.model_max_length = 128


@pytest.mark.slow
def test_joined_articles_give_the_entities_of_each_article_alone(tuned, reuters_texts):
    """Forty real articles joined into one document of many windows are labelled like each article
    alone. The tiny tuned model is context-sensitive (any new neighbour nudges its logits), so this
    compares entity types per subword with a tolerance; the exact no-loss/no-duplicate guarantee is
    `test_windows_merge_exactly_when_predictions_do_not_depend_on_context`."""
    model, tokenizer = tuned
    tagger = Tagger(model, tokenizer, "first", segment="none")
    short = [t for t in reuters_texts if 200 < len(t) < 400][:40]
    alone = tagger.encode(short)
    tagger.forward(alone)
    assert all(len(doc.windows) == 1 for doc in alone)
    joined = "\n\n".join(short)
    doc = tagger.encode([joined])[0]
    assert len(doc.windows) >= 20 and doc.n_tokens == sum(d.n_tokens for d in alone)
    tagger.forward([doc])
    kind = np.array([CONLL_LABELS.index(x) and 1 + (CONLL_LABELS.index(x) - 1) // 2 for x in CONLL_LABELS])
    separate = kind[np.concatenate([d.probs.argmax(1) for d in alone])]
    together = kind[doc.probs.argmax(1)]
    assert (separate != 0).sum() > 300  # entities to compare, not just O
    joins = np.cumsum([0] + [d.n_tokens for d in alone])
    cuts = np.array([b for _, b in doc.keeps[:-1]])
    position = np.arange(doc.n_tokens)
    near = np.min(np.abs(position[:, None] - np.concatenate([joins, cuts])[None, :]), axis=1) <= 8
    assert (separate == together)[~near].mean() >= 0.9
    assert (separate == together).mean() >= 0.88
    spans = tagger.decode(doc, joined)
    assert len(spans) > 150 and all(joined[s.start : s.end] == s.text for s in spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))  # nothing emitted twice


@pytest.mark.slow
def test_a_million_character_document(tiny, reuters_texts):
    model, tokenizer = tiny
    base = "\n".join(reuters_texts[:40])
    text = (base * (1_000_000 // len(base) + 1))[:1_000_000]
    began = time.perf_counter()
    tagger = Tagger(model, tokenizer, "first", batch_size=256, max_batch_tokens=8192)
    doc = tagger.encode([text])[0]
    tagger.forward([doc])
    spans = tagger.decode(doc, text)
    assert time.perf_counter() - began < 120
    assert len(doc.windows) > 2000 and doc.keeps[-1][1] == doc.n_tokens
    assert doc.offsets[-1][1] >= len(text) - 1  # the end of the text was seen
    assert spans and all(text[s.start : s.end] == s.text for s in spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


@pytest.mark.slow
def test_offsets_round_trip_on_real_text(tiny, reuters_texts):
    model, tokenizer = tiny
    texts = reuters_texts[:100] + ["東京 São Paulo\r\n\tZürich 👩‍👩‍👧 e\u0301te\u0301 zero\u200bwidth"]
    tagger = Tagger(model, tokenizer, max_length=32, stride=8)
    docs = tagger.encode(texts)
    tagger.forward(docs)
    for aggregation in ["first", "simple", "average", "max"]:
        tagger.aggregation = aggregation
        for text, doc in zip(texts, docs):
            spans = tagger.decode(doc, text)
            assert all(text[s.start : s.end] == s.text and s.text.strip() == s.text for s in spans)


# Words that have broken offset code somewhere: sentence ends, abbreviations, decomposed and
# composed accents, CJK, Hangul, ZWJ emoji, zero-width and odd spaces, ligatures, line breaks.
TRICKY_WORDS = ["Mr.", "U.S.", ".", "?!", "José", "Jose\u0301", "e\u0301", "東京", "한국", "👩‍👩‍👧", "\u200b", "\u00a0"]
TRICKY_WORDS += ["ﬁ", "İstanbul", "\r\n", "\n\n", "\t", "Zürich", "São Paulo", "IBM", "(", ")", "\ufeff"]
tricky_documents = st.lists(
    st.lists(st.one_of(st.sampled_from(TRICKY_WORDS), st.text(max_size=4)), max_size=60).map(" ".join),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=tricky_documents,
    segment=st.sampled_from(["sentences", "none", "both"]),
    aggregation=st.sampled_from(["first", "simple", "average", "max"]),
    window=st.sampled_from([(16, 4), (24, 8), (None, None)]),
)
@pytest.mark.slow
def test_every_span_of_a_whole_document_points_into_its_text(random_model, texts, segment, aggregation, window):
    """The whole in-memory path (segmentation, windows, merging, decoding) on generated documents:
    every entity is `text[start:end]`, trimmed, in order, never overlapping."""
    model, tokenizer = random_model
    max_length, stride = window
    tagger = Tagger(model, tokenizer, aggregation, max_length=max_length, stride=stride, segment=segment)
    results = tagger.annotate(texts)
    assert len(results) == len(texts)
    for text, spans in zip(texts, results):
        for span in spans:
            assert 0 <= span.start < span.end <= len(text) and text[span.start : span.end] == span.text
            assert span.text == span.text.strip() and 0.0 <= span.score <= 1.0
        assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


def test_bad_stride_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(OptionError, match="stride"):
        Tagger(model, tokenizer, stride=100)


UNICODE_TEXTS = [
    "Zürich und São Paulo: José Ñúñez traf 東京 Holdings 👩‍👩‍👧 in Kraków.",
    "Line one\r\nLine\ttwo with e\u0301te\u0301 and cafe\u0301 — “quoted” Müller-Lüdenscheidt",
    "Zero\u200bwidth\u200bjoined words, an emoji 🇫🇷 flag and ﬁ ligature ＦＵＬＬ width",
    "Ελληνικά και Русский текст, العربية, हिन्दी, and 한국어 mixed with ASCII IBM.",
]


@pytest.mark.parametrize("aggregation", ["simple", "first"])
def test_matches_the_pipeline_on_unicode_text(tiny, aggregation):
    # An independent check of the offsets: the pipeline computes its spans with its own code.
    model, tokenizer = tiny
    pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation)
    found = 0
    ours = tag_texts(UNICODE_TEXTS, model, tokenizer, aggregation=aggregation, segment="none")
    for text, mine in zip(UNICODE_TEXTS, ours):
        theirs = pipe(text)
        assert [(s.start, s.end, s.label) for s in mine] == [(e["start"], e["end"], e["entity_group"]) for e in theirs]
        found += len(mine)
    assert found > 10


@pytest.mark.slow
def test_batches_hold_at_most_the_window_cap_of_the_device(tiny, reuters_texts):
    model, tokenizer = tiny
    texts = [s for text in reuters_texts[:60] for s in text.split(". ")]  # many short sentence windows
    default = Tagger(model, tokenizer, segment="sentences", max_batch_tokens=1 << 20)
    assert default.batch_size == 64  # on CPU; a GPU's default is 1024 (benchmarks/gpu/test_cuda.py)
    docs = default.encode(texts)
    assert sum(len(d.windows) for d in docs) > 200
    assert max(map(len, default.batches(docs))) == 64
    wide = Tagger(model, tokenizer, segment="sentences", batch_size=1024, max_batch_tokens=1 << 20)
    assert max(map(len, wide.batches(docs))) > 64


@pytest.fixture(scope="module")
def demo_texts() -> list[str]:
    """The demo's shipped articles (a few paragraphs each), without its rows of bad text."""
    lines = (DEMO_DATA / "documents.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    return [t for t in texts if isinstance(t, str) and len(t) > 100]


def test_cpu_lanes_give_the_same_probabilities_and_spans(tiny, demo_texts):
    model, tokenizer = tiny
    texts = demo_texts
    threads = torch.get_num_threads()
    serial = Tagger(model, tokenizer, aggregation="simple", segment="sentences", max_batch_tokens=256)
    lanes = Tagger(model, tokenizer, aggregation="simple", segment="sentences", max_batch_tokens=256, lanes=2)
    try:
        assert (serial.lane_count, lanes.lane_count) == (1, 2)
        assert lanes.lanes.submit(torch.get_num_threads).result() == 1  # a lane runs on one torch thread
        one, two = serial.encode(texts), lanes.encode(texts)
        serial.forward(one)
        flight = lanes.launch(two)
        assert len(flight.batches) > 4  # several batches queued to the lanes at once
        lanes.collect(flight)
        for a, b in zip(one, two):
            np.testing.assert_array_equal(a.probs, b.probs)
        spans = lanes.annotate(texts)
        assert spans == serial.annotate(texts)
        assert sum(map(len, spans)) > 40  # the comparison is not vacuous
    finally:
        lanes.close()
    assert lanes.lanes is None and lanes.lane_count == 1
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert torch.get_num_threads() == threads and seen == [threads]  # set back, for later threads too


def test_a_lane_error_reaches_the_caller_and_cancel_drops_queued_batches(tiny, demo_texts):
    model, tokenizer = tiny
    tagger = Tagger(model, tokenizer, segment="sentences", max_batch_tokens=64, lanes=2)
    threads = torch.get_num_threads()
    ran, gate = [], threading.Event()

    def slow_then_fail(ids, mask):
        ran.append(len(ids))
        gate.wait(5)
        raise RuntimeError("model broke")

    tagger.run_batch = slow_then_fail  # every lane blocks on the gate, then fails
    try:
        flight = tagger.launch(tagger.encode(demo_texts[:10]))
        assert len(flight.batches) > 4
        deadline = time.monotonic() + 10
        while len(ran) < 2 and time.monotonic() < deadline:  # both lanes hold a batch
            time.sleep(0.01)
        flight.cancel()  # the two running batches finish; the queued ones never start
        gate.set()
        with pytest.raises(RuntimeError, match="model broke"):
            tagger.collect(flight)
        assert len(ran) == 2
    finally:
        tagger.close()
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("value", "lanes"), [(None, "threads"), ("1", 1), ("3", 3), ("0", None), ("two", None)])
def test_cpu_lanes_follow_the_torch_threads_or_the_environment(monkeypatch, value, lanes):
    from nerbatch.inference import LANES_ENV, cpu_lanes

    monkeypatch.delenv(LANES_ENV, raising=False)
    if value is not None:
        monkeypatch.setenv(LANES_ENV, value)
    if lanes is None:
        with pytest.raises(OptionError, match=f"{LANES_ENV}={value!r}"):
            cpu_lanes("cpu")
        return
    assert cpu_lanes("cpu") == (torch.get_num_threads() if lanes == "threads" else lanes)
    assert cpu_lanes("cuda") == 1  # a GPU queues its batches itself
