"""Inputs and outputs as URIs: fsspec's in-process `memory://`, `file://`, and locations that cannot be used."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

from nerbatch.cli import main
from nerbatch.show import sample_documents
from nerbatch.stats import collect_stats

from conftest import REUTERS, need


def annotate(model: Path, *args) -> object:
    return CliRunner().invoke(main, ["annotate", str(model), *map(str, args), "--no-progress"])


def read_rows(fs, directory: str) -> list[dict]:
    """Every output row under `directory` of `fs`, by doc_id."""
    files = sorted(p for p in fs.find(directory) if p.endswith(".parquet") and "/_nerbatch/" not in p)
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).sort_by("doc_id").to_pylist()


@pytest.fixture
def memory():
    """A clean in-process filesystem (fsspec keeps one store per process)."""
    fs = fsspec.filesystem("memory")
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    yield fs
    MemoryFileSystem.store.clear()


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return pq.read_table(need(REUTERS), columns=["doc_id", "title", "text"]).slice(0, 60)


@pytest.mark.slow
def test_memory_uris_in_and_out_give_the_rows_of_local_paths(tiny_model_dir, table, memory, tmp_path):
    local_in = tmp_path / "in"
    local_in.mkdir()
    pq.write_table(table.slice(0, 40), local_in / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(40), local_in / "b.parquet")
    for name in ("a.parquet", "b.parquet"):
        memory.put_file(str(local_in / name), f"/corpus/{name}")
    options = ("--id-column", "doc_id", "--keep-columns", "title", "--max-length", 32, "--file-rows", 30)
    assert annotate(tiny_model_dir, local_in, "-o", tmp_path / "out", *options).exit_code == 0
    # the output directory inside the input directory: a rerun must not read its own files back
    for _ in range(2):
        result = annotate(tiny_model_dir, "memory://corpus", "-o", "memory://corpus/entities", *options)
        assert result.exit_code == 0, result.output
    local = read_rows(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert read_rows(memory, "/corpus/entities") == local and len(local) == 60
    written = sorted(p.rsplit("/", 1)[1] for p in memory.find("/corpus/entities") if "/_nerbatch/" not in p)
    assert written == ["part-00000.parquet", "part-00001.parquet"]
    assert not [p for p in memory.find("/corpus/entities/_nerbatch") if "/tmp/" in p or "/pieces/" in p]
    stats = collect_stats("memory://corpus/entities")  # `nerbatch stats` and `show` read URIs too
    assert stats["complete"] and stats["rows"] == 60 and stats["files"] == 2
    by_id = {row["doc_id"]: row["text"] for row in table.to_pylist()}
    sample = sample_documents("memory://corpus/entities", 5, seed=1)
    assert len(sample) == 5 and all(doc["text"] == by_id[doc["id"]["doc_id"]] for doc in sample)


class DeniedFileSystem(MemoryFileSystem):
    """A store that refuses every listing, as an object store does without credentials."""

    protocol = "denied"

    def ls(self, path, detail=True, **kwargs):
        raise PermissionError(f"Access Denied: {path}")

    def info(self, path, **kwargs):
        raise PermissionError(f"Access Denied: {path}")


@pytest.mark.parametrize(
    ("where", "spec", "message"),
    [
        ("input", "nosuch://bucket/corpus", "nosuch://bucket/corpus: cannot open this location (Protocol not known"),
        ("input", "denied://bucket/corpus", "denied://bucket/corpus: cannot list this location (PermissionError"),
        ("output", "denied://bucket/out", "denied://bucket/out: cannot use this location (PermissionError"),
        ("output", "nosuch://bucket/out", "nosuch://bucket/out: cannot open this location"),
    ],
)
@pytest.mark.slow
def test_a_location_that_cannot_be_used_is_one_line_before_any_work(
    tiny_model_dir, table, tmp_path, where, spec, message
):
    fsspec.register_implementation("denied", DeniedFileSystem, clobber=True)
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    inputs, out = (spec, tmp_path / "out") if where == "input" else (source, spec)
    result = annotate(tiny_model_dir, inputs, "-o", out)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_uris_keep_the_host_where_the_filesystem_drops_it(memory):
    """hdfs://namenode:8020/data -> fsspec path "/data": the recorded URI (source_file, messages, the
    unit's reopening) must still name the namenode."""
    from nerbatch.storage import Location, locate

    directory = Location(memory, "/data", "hdfs://namenode:8020")
    assert (directory / "a.parquet").uri == "hdfs://namenode:8020/data/a.parquet"
    assert directory.parent.uri == "hdfs://namenode:8020/"
    assert locate("memory://bucket/key.parquet").uri == "memory:///bucket/key.parquet"  # the path keeps it
    assert locate(f"file://{Path('/tmp/../tmp/x').as_posix()}").uri == "/tmp/x"
