"""The user docs cannot drift: generated CLI reference, links, paths, shell blocks, figures.

What is checked, and the tables it depends on (substitutions, scratch fixtures, figures), are in
tests/docs_check.py. Blocks are collected from the docs when the tests are collected, so each
runnable or tagged block is a test of its own, named PAGE:LINE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

import docs_check
from conftest import built_once
from docs_check import Block
from models import DEMO_DATA

PAGES = docs_check.doc_files()
BLOCKS = [block for page in PAGES for block in docs_check.parse(page)[0]]
SHELL = [b for b in BLOCKS if b.shell]
TAGGED = [b for b in SHELL if b.tags]
RUNNABLE = [b for b in BLOCKS if b.runs]


def ids(items) -> list[str]:
    return [item.id if isinstance(item, Block) else docs_check.rel(item) for item in items]


# --- docs/cli.md ---------------------------------------------------------------------------------


def test_the_cli_reference_is_what_help_prints():
    difference = docs_check.cli_difference()
    assert difference is None, f"docs/cli.md is out of date: run `make docs`\n{difference}"


def test_the_cli_reference_has_a_section_per_command():
    from nerbatch.cli import main

    text = docs_check.cli_markdown()
    assert "make docs" in text.splitlines()[2]
    for command in main.commands:
        assert f"\n## nerbatch {command}\n\n```text\nUsage: nerbatch {command} [OPTIONS]" in text
    assert not docs_check.link_problems(docs_check.CLI_DOC)


def test_a_stale_cli_reference_is_caught(tmp_path, monkeypatch):
    stale = tmp_path / "cli.md"
    stale.write_text(docs_check.cli_markdown().replace("--max-length", "--max-len", 1))
    monkeypatch.setattr(docs_check, "CLI_DOC", stale)
    assert "--max-len" in docs_check.cli_difference()
    assert docs_check.main([]) == 1
    assert docs_check.main(["--write"]) == 0 and docs_check.cli_difference() is None


# --- fences, links, paths ------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_every_fenced_block_has_a_known_language(page):
    problems = [p for block in docs_check.parse(page)[0] if (p := docs_check.fence_problem(block))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_every_relative_link_and_anchor_resolves(page):
    problems = docs_check.link_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_every_repository_path_named_exists(page):
    problems = docs_check.path_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", SHELL, ids=ids(SHELL))
def test_every_nerbatch_option_in_a_shell_block_exists(block):
    problems = docs_check.option_problems(block)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_every_nerbatch_option_in_inline_code_exists(page):
    problems = docs_check.call_problems(docs_check.prose_calls(page))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_every_job_file_shown_has_only_train_settings(page):
    problems = docs_check.toml_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("block", TAGGED, ids=ids(TAGGED))
def test_a_block_not_run_is_valid_shell(block):
    done = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{block.id}: bash -n: {done.stderr}"


# --- the checker itself, on a sample page --------------------------------------------------------

SAMPLE = """# Sample

## Getting started: `nerbatch train`, fast!

See [the CLI](../docs/cli.md#nerbatch-annotate), [below](#options), [gone](missing.md), `nerbatch show --sample 3`,
[bad anchor](#nowhere) and [the site](https://example.com/x#y). Jobs: `jobs/conll2003-minilm-offline.toml`,
`jobs/no-such-job.toml`, `launch/*.yaml`; not a path: `runs/conll-bert`; `nerbatch stats OUT --jsn`.

## Options

```sh gpu
accelerate launch --config_file launch/multi-gpu.yaml -m nerbatch annotate runs/conll-bert dump/ \\
    --output out/ \\
    --max-lenght 256   # a typo
srun bash -c 'python -m nerbatch train --config jobs/x.toml --epoch 3'
pip install nerbatch && nerbatch stats out/ --json | head
nerbatch --version; nerbatch anotate x
```

```bash
nerbatch demo
```

```python run
print("hi")
```

```toml
model = "bert-base-cased"
label_first_subword = true
```
"""


def sample_page(tmp_path: Path) -> Path:
    page = tmp_path / "docs" / "sample.md"
    page.parent.mkdir()
    page.write_text(SAMPLE)
    return page


def test_the_checker_finds_what_drifted(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_check, "REPO", tmp_path)  # the sample page's links stay inside "the repository"
    (tmp_path / "docs" / "cli.md").parent.mkdir()
    shutil.copy(docs_check.CLI_DOC, tmp_path / "docs" / "cli.md")
    page = tmp_path / "docs" / "sample.md"
    page.write_text(SAMPLE)
    assert docs_check.anchors(page) == {"sample", "getting-started-nerbatch-train-fast", "options"}
    problems = "\n".join(docs_check.link_problems(page))
    assert "link 'missing.md': no such file" in problems and "has no heading #nowhere" in problems
    assert "cli.md" not in problems and "#below" not in problems and "example.com" not in problems
    assert len(docs_check.link_problems(page)) == 2

    monkeypatch.setattr(docs_check, "REPO", docs_check.CLI_DOC.parents[1])
    paths = [p for _, p in docs_check.named_paths(page)]
    assert paths == [
        "jobs/conll2003-minilm-offline.toml",
        "jobs/no-such-job.toml",
        "launch/*.yaml",
        "launch/multi-gpu.yaml",
        "jobs/x.toml",
    ]
    problems = docs_check.path_problems(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "`jobs/no-such-job.toml` does not exist (paths in the docs are relative to the repository root)",
        "`jobs/x.toml` does not exist (paths in the docs are relative to the repository root)",
    ]

    blocks = docs_check.parse(page)[0]
    assert [(b.line, b.lang, b.tags, b.runs) for b in blocks] == [
        (11, "sh", {"gpu"}, False),
        (20, "bash", set(), False),
        (24, "python", {"run"}, True),
        (28, "toml", set(), False),
    ]
    calls = docs_check.nerbatch_calls(blocks[0].text)
    assert [(c.offset, c.command) for c in calls] == [
        (0, "annotate"),
        (3, "train"),
        (4, "stats"),
        (5, None),
        (5, "anotate"),
    ]
    assert calls[0].args == ("runs/conll-bert", "dump/", "--output", "out/", "--max-lenght", "256")
    problems = docs_check.option_problems(blocks[0])
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{page}:12: `nerbatch annotate --max-lenght`: no such option")
    assert problems[1].startswith(f"{page}:15: `nerbatch train --epoch`: no such option")
    assert problems[2].startswith(f"{page}:17: `nerbatch anotate`: no such command")
    assert "use ```sh" in docs_check.fence_problem(blocks[1])
    prose = docs_check.call_problems(docs_check.prose_calls(page))
    assert [p.split(": no such")[0] for p in prose] == [f"{page}:7: `nerbatch stats --jsn`"]
    assert docs_check.toml_problems(page) == [
        f"{page}:28: job keys ['label_first_subword'] are not `nerbatch train` settings (nerbatch.config.TrainConfig)"
    ]
    assert docs_check.fence_problem(blocks[0]) is None and docs_check.fence_problem(blocks[2]) is None


def test_slugs_follow_github():
    assert docs_check.slug("From a clone into an existing CUDA environment") == (
        "from-a-clone-into-an-existing-cuda-environment"
    )
    assert docs_check.slug("Cores, host RAM and GPU memory") == "cores-host-ram-and-gpu-memory"
    assert docs_check.slug("`nerbatch annotate`") == "nerbatch-annotate"
    assert docs_check.slug("Layout of OUT_DIR") == "layout-of-out_dir"
    assert docs_check.slug("Why *my* run is [slow](x.md) (1/2)?") == "why-my-run-is-slow-12"


def test_substitutions_and_job_overrides():
    values = {"base_model": "/m"}
    text = "nerbatch train --model bert-base-cased --config jobs/conll2003-bert-base-cased.toml # bert-base-cased-x"
    assert docs_check.substitute(text, values) == (
        "nerbatch train --model /m --config jobs/conll2003-bert-base-cased.toml # bert-base-cased-x"
    )
    job = (docs_check.REPO / "jobs" / "conll2003-bert-base-cased.toml").read_text()
    from nerbatch.config import tomllib

    overridden = tomllib.loads(docs_check.override_job(job, values))
    assert overridden["model"] == "/m" and overridden["train"] == "data/train.conll" and overridden["epochs"] == 1
    assert overridden["lr"] == tomllib.loads(job)["lr"]


# --- headline figures ----------------------------------------------------------------------------


def test_the_headline_figures_are_the_result_files():
    problems = docs_check.figure_problems()
    assert not problems, "\n".join(problems)


def test_the_guide_pages_figures_are_the_result_files():
    problems = docs_check.page_figure_problems()
    assert not problems, "\n".join(problems)


def test_a_guide_page_figure_that_drifted_or_lost_its_link_is_caught(tmp_path, monkeypatch):
    figure = docs_check.PAGE_FIGURES["docs/running-at-scale.md"][0]
    monkeypatch.setattr(docs_check, "REPO", tmp_path)
    (tmp_path / figure.file).parent.mkdir(parents=True)
    shutil.copy(docs_check.CLI_DOC.parents[1] / figure.file, tmp_path / figure.file)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    link = f"[result](../{figure.file})"
    page.write_text(f"Ray took {figure.text} ({link}).\n")
    assert docs_check.page_figure_problems({"docs/page.md": [figure]}) == []
    page.write_text(f"Ray took 1.0 s ({link}).\n")
    assert docs_check.page_figure_problems({"docs/page.md": [figure]}) == [
        f"docs/page.md: does not show {figure.text!r}"
    ]
    page.write_text(f"Ray took {figure.text}.\n")
    assert "without linking it" in docs_check.page_figure_problems({"docs/page.md": [figure]})[0]


def test_a_figure_that_drifted_is_caught(tmp_path, monkeypatch):
    figure = docs_check.FIGURES[0]
    row = f"| F1 | {figure.text} | [result]({figure.file}) |"
    readme = tmp_path / "README.md"
    monkeypatch.setattr(docs_check, "REPO", tmp_path)
    (tmp_path / figure.file).parent.mkdir(parents=True)
    shutil.copy(docs_check.CLI_DOC.parents[1] / figure.file, tmp_path / figure.file)
    monkeypatch.setattr(docs_check, "FIGURES", [figure])
    readme.write_text(f"| what | figure | source |\n|---|---|---|\n{row}\n")
    assert docs_check.figure_problems(readme) == []
    readme.write_text(readme.read_text().replace(figure.text, "0.9"))
    assert any(f"shows {figure.text!r}" in p for p in docs_check.figure_problems(readme))
    monkeypatch.setattr(docs_check, "FIGURES", [figure.__class__("0.9", figure.file, figure.path, figure.fmt)])
    assert f"{figure.path} is {figure.text!r}, the README says '0.9'" in docs_check.figure_problems(readme)[0]


# --- runnable blocks -----------------------------------------------------------------------------


def write_dump(directory: Path) -> Path:
    """The `dump/` fixture: the 26 demo documents (one null, one whitespace-only text) and 6 more,
    with doc_id, text, title, date and lang columns, in part-0.parquet (row groups of 8) and part-1.parquet."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DEMO_DATA / "documents.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += [
        {"doc_id": f"extra-{i}", "text": f"Talks between Paris and Rome resumed on Monday, day {i}."} for i in range(6)
    ]
    table = pa.table(
        {
            "doc_id": [r["doc_id"] for r in rows],
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "title": [" ".join((r["text"] or "").split()[:4]) for r in rows],
            "date": [datetime.date(2026, 11, 1 + i % 28) for i in range(len(rows))],
            "lang": ["en" if i % 4 else "fr" for i in range(len(rows))],
        }
    )
    directory.mkdir(parents=True)
    pq.write_table(table.slice(0, 16), directory / "part-0.parquet", row_group_size=8)
    pq.write_table(table.slice(16), directory / "part-1.parquet")
    return directory


@pytest.fixture(scope="session")
@built_once
def doc_fixtures(tiny_model_dir, tmp_path_factory) -> Path:
    """The SCRATCH fixtures of docs_check, built once: each page's scratch directory is a copy."""
    from click.testing import CliRunner

    from nerbatch.cli import main

    root = tmp_path_factory.mktemp("doc-fixtures")
    (root / "data").mkdir()
    for name in ["train.conll", "valid.conll"]:
        shutil.copy(DEMO_DATA / name, root / "data" / name)
    write_dump(root / "dump")
    model = root / "runs" / "conll-bert"
    args = ["train", "--model", str(tiny_model_dir), "--train", str(root / "data" / "train.conll")]
    args += ["--validation", str(root / "data" / "valid.conll"), "--output-dir", str(model), "--epochs", "1"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert set(docs_check.SCRATCH) == {
        "runs/conll-bert/",
        "dump/",
        "data/train.conll",
        "data/valid.conll",
        "jobs/",
        "launch/",
    }
    return root


class PageRun:
    """One page's runnable blocks, run in order, once each, in one scratch directory: a block runs
    only if every block before it on the page succeeded. `outcome(block)` is None, or why it failed."""

    def __init__(self, page: Path, blocks: list[Block], directory: Path, values: dict[str, str], zygote=None):
        self.page, self.blocks, self.directory, self.values, self.zygote = page, blocks, directory, values, zygote
        self.results: dict[int, str | None] = {}
        self.ready = {block.line: threading.Event() for block in blocks}
        self.lock = threading.Lock()
        self.started = False

    def run_through(self, line: int) -> None:
        """Run the page's prelude and its blocks up to the one at `line` that have not run yet."""
        with self.lock:
            if not self.started:
                self.started = True
                prelude = docs_check.PRELUDES.get(docs_check.rel(self.page))
                problem = prelude and docs_check.run_script(prelude, BASH, self.directory, ".prelude.sh", self.zygote)
                if problem:
                    self.results[0] = f"the prelude of this page (docs_check.PRELUDES) failed: {problem}"
            for block in [b for b in self.blocks if b.line <= line and b.line not in self.results]:
                failed = next((result for result in self.results.values() if result), None)
                if failed:
                    self.results[block.line] = f"{block.id} not run: an earlier block of the page failed:\n{failed}"
                else:
                    self.results[block.line] = docs_check.run_block(block, self.directory, self.values, self.zygote)
                self.ready[block.line].set()

    def outcome(self, block: Block, timeout: float | None = None) -> str | None:
        """The outcome of `block`: run it (and the blocks before it), or wait for the thread that does."""
        if timeout is None:
            self.run_through(block.line)
        elif not self.ready[block.line].wait(timeout):
            return f"{block.id}: no outcome after {timeout:.0f} s"
        return self.results[block.line]


BASH = ["bash", "-euo", "pipefail"]
PAGE_WORKERS = max(1, min(4, os.cpu_count() or 1))  # pages run side by side (each nerbatch: one thread)


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    """The doc blocks' `nerbatch`, forked from a process that imported nerbatch once (docs_check's
    zygote); None (a process per command) with NERBATCH_DOCS_ZYGOTE=0."""
    if not docs_check.zygote_enabled():
        yield None
        return
    server = docs_check.start_zygote(tmp_path_factory.mktemp("zygote"))  # page_runs waits until it is ready
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def page_runs(request, zygote, doc_fixtures, tiny_model_dir, tmp_path_factory):
    """page -> its PageRun. The pages of the runnable blocks this session selected run in the
    background from the start, PAGE_WORKERS at a time (the longest first), each up to its last
    selected block; a test waits for its block's outcome."""
    values = {"base_model": str(tiny_model_dir)}
    if zygote is not None:
        zygote.wait_ready()  # it imported nerbatch while doc_fixtures were built

    def new(page: Path, blocks: list[Block]) -> PageRun:
        return PageRun(
            page, blocks, docs_check.make_scratch(tmp_path_factory.mktemp("page"), doc_fixtures, values), values
        )

    selected = [
        item.callspec.params["block"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_a_runnable_block_runs"
    ]
    pages = {block.page: None for block in selected}
    runs = {page: new(page, [b for b in RUNNABLE if b.page == page]) for page in pages}
    last = {block.page: block.line for block in sorted(selected, key=lambda b: b.line)}

    def cost(page: Path) -> int:  # seconds, roughly: a nerbatch command 2, a launch of several processes 10
        blocks = [b for b in runs[page].blocks if b.line <= last[page]]
        return sum(2 * len(docs_check.nerbatch_calls(b.text)) + 8 * b.text.count("accelerate launch") for b in blocks)

    pool = ThreadPoolExecutor(PAGE_WORKERS, thread_name_prefix="doc-page")
    for page in sorted(runs, key=cost, reverse=True):
        pool.submit(runs[page].run_through, last[page])
    try:
        yield SimpleNamespace(runs=runs, new=new)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=ids(RUNNABLE))
def test_a_runnable_block_runs(block, page_runs):
    problem = page_runs.runs[block.page].outcome(block, timeout=docs_check.BLOCK_TIMEOUT_S * 10)
    if problem:
        pytest.fail(problem, pytrace=False)


RUN_SAMPLE = """# Sample

```sh
nerbatch train --model bert-base-cased --train data/train.conll --validation data/valid.conll \\
    --output-dir runs/mine --epochs 1 --max-train-samples 40
nerbatch annotate runs/conll-bert dump/ --output out/ --keep-columns title --no-progress
```

```sh
nerbatch stats out/ --json > stats.json
test -f jobs/conll2003-bert-base-cased.toml && test -f launch/annotate.slurm && test -d runs/mine
```

```python run
import json
import duckdb
stats = json.load(open("stats.json"))
rows = duckdb.sql("select count(*) from 'out/*.parquet'").fetchall()[0][0]
assert rows == 32 and stats["complete"] is True, (rows, stats)
```

```sh
false
```

```sh
echo never
```
"""


@pytest.mark.slow
def test_blocks_of_a_page_run_in_order_in_one_scratch_directory(tmp_path, page_runs):
    page = tmp_path / "sample.md"
    page.write_text(RUN_SAMPLE)
    blocks = [b for b in docs_check.parse(page)[0] if b.runs]
    assert len(blocks) == 5
    page_run = page_runs.new(page, blocks)
    assert page_run.outcome(blocks[2]) is None  # runs the two before it first
    assert page_run.results == {3: None, 9: None, 14: None}
    problem = page_run.outcome(blocks[4])
    assert problem.startswith(f"{page}:26 not run: an earlier block of the page failed:\n{page}:22: the block failed")
    assert "exit status 1" in problem and not (page_run.directory / ".block-26.sh").exists()


@pytest.mark.slow
def test_the_zygote_runs_nerbatch_as_the_console_script_does(zygote, tmp_path):
    if zygote is None:
        pytest.skip("NERBATCH_DOCS_ZYGOTE=0")
    zygote.wait_ready()
    script = f"""
test "$(command -v nerbatch)" = {zygote.bin}/nerbatch
nerbatch --version | grep -q '^nerbatch, version '
mkdir here && cd here
if nerbatch stats missing > out.txt 2> err.txt; then exit 9; fi
grep -q '^Error: .*missing' err.txt && test ! -s out.txt
"""
    assert docs_check.run_script(script, BASH, tmp_path, "zygote.sh", zygote) is None
    assert docs_check.run_script("nerbatch stats .", BASH, tmp_path, "fails.sh", zygote).startswith("exit status 1")
