"""Helpers shared by the tests: running nerbatch as real processes, and small data/model builders.

Fixtures live in `conftest.py`; this module holds plain functions that tests import by name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from nerbatch.dist import launch_command

from conftest import REPO, need


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra) -> dict:
    """The environment of a nerbatch subprocess: offline, one thread per process (the tests run
    several processes on two cores), and this checkout importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def nerbatch_command(args: list[str], processes: int = 1) -> list[str]:
    """`python -m nerbatch ARGS`, under `accelerate launch` with `processes` real processes when > 1."""
    prefix = launch_command(processes, free_port()) if processes > 1 else [sys.executable]
    return prefix + ["-m", "nerbatch"] + list(args)


def run(args: list[str], processes: int = 1) -> str:
    """Run `nerbatch` as a subprocess that must succeed; return its stdout."""
    done = subprocess.run(
        nerbatch_command(args, processes), env=environment(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def last_json(stdout: str) -> dict:
    """The JSON object on the last line of a command's output (evaluate's metrics)."""
    return json.loads(stdout.strip().splitlines()[-1])


def write_conll(sentences, path: Path, documents: bool = False) -> Path:
    """Write sentences as a 2-column CoNLL file (with -DOCSTART- lines between documents if asked)."""
    lines, previous = [], None
    for s in sentences:
        if documents and s.document != previous:
            lines.append("-DOCSTART- O\n\n")
            previous = s.document
        lines.append("".join(f"{w} {t}\n" for w, t in zip(s.words, s.tags)) + "\n")
    path.write_text("".join(lines))
    return path


def good_and_corrupt_inputs(table, directory: Path) -> Path:
    """`directory`/in with `table` twice: good.parquet, and zcorrupt.parquet whose data pages are
    zeroed (footer intact, so planning reads it and its unit fails while reading)."""
    import pyarrow.parquet as pq

    inputs = directory / "in"
    inputs.mkdir()
    pq.write_table(table, inputs / "good.parquet")
    pq.write_table(table, inputs / "zcorrupt.parquet", compression="zstd")
    data = bytearray((inputs / "zcorrupt.parquet").read_bytes())
    data[100:2000] = bytes(1900)  # inside the text column's pages, well before the footer
    (inputs / "zcorrupt.parquet").write_bytes(bytes(data))
    return inputs


def reuters_corpus(directory: Path, start: int) -> Path:
    """180 Reuters rows from `start` in `directory`: a.parquet in 5 row groups of 30, b.parquet in
    one (6 units)."""
    import pyarrow.parquet as pq

    from conftest import REUTERS

    table = pq.read_table(need(REUTERS), columns=["doc_id", "text"]).slice(start, 180)
    pq.write_table(table.slice(0, 150), directory / "a.parquet", row_group_size=30)
    pq.write_table(table.slice(150), directory / "b.parquet")
    return directory


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc/PID/stat file after the command name (state first), None once gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except OSError:  # the process exited meanwhile
        return None


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has), from /proc."""
    fields = _stat_fields(Path("/proc") / str(pid) / "stat")
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """The running processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def all_gone(pids: list[int], seconds: float) -> bool:
    """Wait up to `seconds` for every process of `pids` to exit; whether they all did."""
    deadline = time.monotonic() + seconds
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(running(pid) for pid in pids)


# Rows the annotate job flags, and a text whose markup the HTML page must escape (the `corpus` fixture).
EXTRA = {
    "extra-empty": "",
    "extra-blank": " \t\n ",
    "extra-markup": "<script>alert('x')</script> Talks between Paris & Rome resumed on Monday.",
    "extra-short": "Angela Merkel met Emmanuel Macron in Paris.",
}


def annotate_in_process(model: Path, *args) -> object:
    """`nerbatch annotate` in this process (click's CliRunner); exceptions propagate."""
    from click.testing import CliRunner

    from nerbatch.cli import main

    return CliRunner().invoke(main, ["annotate", str(model), *map(str, args), "--no-progress"], catch_exceptions=False)


def output_rows(out: Path) -> list[dict]:
    """Every row of OUT_DIR's output files, in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))).to_pylist()
