"""Analytics-sized output: file and row-group sizes, kept columns, Hive partitions, and their bad input."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.cli import main

from conftest import REUTERS, need

LANGS = ["en", "de", "fr"]


def annotate(model: Path, *args) -> object:
    return CliRunner().invoke(main, ["annotate", str(model), *map(str, args), "--no-progress"])


def reuters_table(rows: int) -> pa.Table:
    """Reuters rows with the columns analysts keep: a string date and title, a timestamp, a language."""
    table = pq.read_table(need(REUTERS), columns=["doc_id", "date", "title", "text"]).slice(0, rows)
    start = dt.datetime(1987, 2, 26)
    published = pa.array([start + dt.timedelta(minutes=i) for i in range(rows)], pa.timestamp("ms"))
    lang = pa.array([LANGS[i % 3] for i in range(rows)])
    return table.append_column("published", published).append_column("lang", lang)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """600 rows in 60 row groups of 10 (small input row groups), plus a second file of 60 rows."""
    table = reuters_table(660)
    directory = tmp_path_factory.mktemp("layout-corpus")
    pq.write_table(table.slice(0, 600), directory / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(600), directory / "b.parquet")
    return directory


def annotate_sized(model: Path, corpus: Path, out: Path, row_group_rows: int, file_rows: int) -> Path:
    """The corpus with the id and three kept columns, in files and row groups of the sizes given."""
    sizes = ("--row-group-rows", row_group_rows, "--file-rows", file_rows)
    kept = ("--keep-columns", "date,title,published")
    result = annotate(model, corpus, "-o", out, "--id-column", "doc_id", "--max-length", 32, *sizes, *kept)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def sized(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    return annotate_sized(tiny_model_dir, corpus, tmp_path_factory.mktemp("sized") / "out", 100, 400)


@pytest.mark.slow
def test_small_input_row_groups_become_few_files_of_large_row_groups(sized, corpus):
    files = sorted(sized.glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]  # 61 units, 2 files
    sizes = [
        [pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
        for f in files
    ]
    assert sizes == [[100, 100, 100, 100], [100, 100, 60]]  # every row group full except each file's last
    ids = pa.concat_tables(pq.read_table(f) for f in files)["doc_id"].to_pylist()
    expected = (
        pq.read_table(corpus / "a.parquet")["doc_id"].to_pylist()
        + pq.read_table(corpus / "b.parquet")["doc_id"].to_pylist()
    )
    assert ids == expected  # one row per input row, in input order


@pytest.mark.slow
def test_the_layout_does_not_change_the_rows(tiny_model_dir, sized, corpus, tmp_path):
    """The same run with one file per input row group (the old layout) has the same rows."""
    out = annotate_sized(tiny_model_dir, corpus, tmp_path / "small", 10, 1)
    assert len(list(out.glob("*.parquet"))) == 61
    query = "SELECT * EXCLUDE (entities), to_json(entities) FROM read_parquet('{}/*.parquet') ORDER BY doc_id"
    assert duckdb.sql(query.format(out)).fetchall() == duckdb.sql(query.format(sized)).fetchall()


@pytest.mark.slow
def test_kept_columns_keep_their_types_and_values(sized, corpus):
    source = pa.concat_tables([pq.read_table(corpus / "a.parquet"), pq.read_table(corpus / "b.parquet")])
    output = pa.concat_tables(pq.read_table(f) for f in sorted(sized.glob("*.parquet")))
    assert output.column_names[:4] == ["doc_id", "date", "title", "published"]
    for name in ("doc_id", "date", "title", "published"):
        assert output.schema.field(name).type == source.schema.field(name).type
        assert output[name].to_pylist() == source[name].to_pylist()


@pytest.mark.slow
def test_partition_by_writes_hive_directories_that_readers_prune_on(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    result = annotate(
        tiny_model_dir,
        corpus,
        "-o",
        out,
        "--id-column",
        "doc_id",
        "--max-length",
        32,
        "--partition-by",
        "lang",
        "--file-rows",
        400,
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet") if "_nerbatch" not in p.parts) == [
        f"lang={lang}/part-{k:05d}.parquet" for lang in sorted(LANGS) for k in range(2)
    ]
    assert "lang" not in pq.read_schema(out / "lang=en" / "part-00000.parquet").names  # the value is in the path
    counts = duckdb.sql(
        f"SELECT lang, count(*) FROM read_parquet('{out}/*/*.parquet', hive_partitioning = true) GROUP BY 1"
    ).fetchall()
    assert dict(counts) == {"en": 220, "de": 220, "fr": 220}
    source = pa.concat_tables([pq.read_table(corpus / "a.parquet"), pq.read_table(corpus / "b.parquet")])
    by_id = dict(zip(source["doc_id"].to_pylist(), source["lang"].to_pylist()))
    german = duckdb.sql(f"SELECT doc_id FROM read_parquet('{out}/lang=de/*.parquet')").fetchall()
    assert {by_id[i] for (i,) in german} == {"de"}


@pytest.mark.slow
def test_annotate_never_imports_pandas(tiny_model_dir, corpus, tmp_path):
    """pyarrow imports pandas whenever it converts a Python value (0.09 s and 34 MiB per process);
    annotate builds its arrays from buffers and filters partitions with Arrow scalars, so a whole
    process, int8 with kept columns and partitions, runs without it."""
    pytest.importorskip("pandas")  # installed (datasets needs it): otherwise nothing to prove
    script = "import sys; from nerbatch.cli import main; main(sys.argv[1:], standalone_mode=False); print(*sys.modules)"
    args = [*("annotate", tiny_model_dir, corpus, "-o", tmp_path / "out", "--id-column", "doc_id", "--max-length", 32)]
    args += ["--precision", "int8", "--partition-by", "lang", "--keep-columns", "date,title,published", "--no-progress"]
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=True)
    modules = done.stdout.strip().splitlines()[-1].split()
    assert "pyarrow" in modules and "pandas" not in modules
    assert pq.read_table(tmp_path / "out" / "lang=fr").num_rows == 220


@pytest.mark.slow
def test_a_dictionary_encoded_partition_column_splits_like_a_plain_one(tiny_model_dir, tmp_path):
    """Partitions are selected with Arrow scalars (`pc.equal(keys, scalar)`); a dictionary column,
    as Spark and pandas often write categories, gives the same directories and rows."""
    table = reuters_table(60)
    source = tmp_path / "dict.parquet"
    lang = table.schema.get_field_index("lang")
    pq.write_table(table.set_column(lang, "lang", table["lang"].dictionary_encode()), source)
    out = tmp_path / "out"
    options = ("--id-column", "doc_id", "--max-length", 32, "--partition-by", "lang")
    result = annotate(tiny_model_dir, source, "-o", out, *options)
    assert result.exit_code == 0, result.output
    assert pq.read_schema(source).field("lang").type.id == pa.dictionary(pa.int32(), pa.string()).id
    for k, lang in enumerate(LANGS):
        ids = pq.read_table(out / f"lang={lang}", columns=["doc_id"])["doc_id"].to_pylist()
        assert sorted(ids) == sorted(table["doc_id"].to_pylist()[k::3])


def write_pair(directory: Path, second: pa.Table) -> Path:
    """A good file plus a second file that differs from it."""
    directory.mkdir()
    pq.write_table(reuters_table(20), directory / "a.parquet")
    pq.write_table(second, directory / "b.parquet")
    return directory


@pytest.mark.parametrize(
    ("change", "options", "message"),
    [
        (lambda t: t.drop_columns(["title"]), ["--keep-columns", "title"], "b.parquet: no column 'title'"),
        (
            lambda t: t.set_column(2, "title", pa.array(range(t.num_rows))),
            ["--keep-columns", "title"],
            "b.parquet: column 'title' is int64, but string in",
        ),
        (
            lambda t: t.set_column(t.schema.get_field_index("lang"), "lang", pa.array(["en", None] * 10)),
            ["--partition-by", "lang"],
            "b.parquet: row 1: column 'lang' is null",
        ),
        (
            lambda t: t.set_column(t.schema.get_field_index("lang"), "lang", pa.array(["en", "../x"] * 10)),
            ["--partition-by", "lang"],
            "'../x', which is not a safe directory name",
        ),
        (lambda t: t, ["--partition-by", "lang", "--keep-columns", "lang"], "cannot also be the id or a kept column"),
        (lambda t: t, ["--keep-columns", "title,error"], "'error': the output has its own 'error'"),
        (
            lambda t: t,
            ["--partition-by", "published"],  # a timestamp (or a float) has no exact, portable directory name
            "column 'published' is timestamp[ms]; --partition-by takes strings, integers, booleans or dates",
        ),
    ],
    ids=[
        "kept-missing",
        "kept-other-type",
        "partition-null",
        "partition-unsafe",
        "partition-kept",
        "kept-output-name",
        "partition-timestamp",
    ],
)
@pytest.mark.slow
def test_bad_kept_or_partition_columns_are_refused_before_any_work(tiny_model_dir, tmp_path, change, options, message):
    inputs = write_pair(tmp_path / "in", change(reuters_table(20)))
    out = tmp_path / "out"
    result = annotate(tiny_model_dir, inputs, "-o", out, *options)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_many_partitions_are_written_a_few_at_a_time_with_the_same_result(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    """Open partition files are capped (MAX_OPEN_FILES): more partitions take more passes, same output."""
    import nerbatch.assemble

    args = ("--id-column", "doc_id", "--max-length", 32, "--partition-by", "lang")
    assert annotate(tiny_model_dir, corpus / "b.parquet", "-o", tmp_path / "one-pass", *args).exit_code == 0
    monkeypatch.setattr(nerbatch.assemble, "MAX_OPEN_FILES", 1)
    assert annotate(tiny_model_dir, corpus / "b.parquet", "-o", tmp_path / "passes", *args).exit_code == 0
    query = (
        "SELECT lang, doc_id, to_json(entities) FROM read_parquet('{}/*/*.parquet', hive_partitioning = true) "
        "ORDER BY 2"
    )
    one, many = (duckdb.sql(query.format(tmp_path / d)).fetchall() for d in ("one-pass", "passes"))
    assert one == many and len(one) == 60 and {row[0] for row in one} == set(LANGS)


def test_partition_names_follow_hive():
    from nerbatch.assemble import partition_name

    assert [partition_name(v) for v in (True, False, 7, "en", dt.date(1987, 2, 26))] == [
        "true",
        "false",
        "7",
        "en",
        "1987-02-26",
    ]
