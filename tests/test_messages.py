"""The messages users meet on a cluster, as nerbatch prints them, and as docs/troubleshooting.md shows them.

Each test triggers one message the cheapest way that still runs the code that words it (the command
line in this process, or the function that raises, with fake collaborators where the real ones
would need a cluster), checks what it says, then compares it with the ```text block after
`<!-- message: KEY -->` in the docs (`docs_check.message_problem`: on a difference, the failure
shows the block to paste). Temporary paths are shown as docs_check.MESSAGE_ROOT.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import click
import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.cli import main
from nerbatch.config import ConfigError, TrainConfig
from nerbatch.parquet_io import InputError
from nerbatch.rundir import RunDir
from nerbatch.shards import discover_inputs, plan_units, warn_about_units
from nerbatch.train import restore

import docs_check
from conftest import REPO


def as_printed(exc: Exception) -> str:
    """A `NerbatchError` as the command line prints it (`Commands` turns it into a ClickException)."""
    out = io.StringIO()
    click.ClickException(str(exc)).show(file=out)
    return out.getvalue()


def shown(text: str, tmp_path: Path) -> str:
    """`text` with the test's temporary directory written as the docs show it."""
    for root in {str(tmp_path.resolve()), str(tmp_path)}:
        text = text.replace(root, docs_check.MESSAGE_ROOT)
    return text.rstrip("\n")


def assert_in_docs(key: str, *printed: str) -> None:
    problem = docs_check.message_problem(key, *printed)
    assert problem is None, problem


def test_every_message_key_in_the_docs_is_a_known_one():
    unknown = {key: [where for where, _ in found] for key, found in docs_check.message_blocks().items()}
    unknown = {key: where for key, where in unknown.items() if key not in docs_check.MESSAGE_KEYS}
    assert not unknown, f"<!-- message: KEY --> with keys no test produces: {unknown}"
    missing_blocks = [w for found in docs_check.message_blocks().values() for w, text in found if text is None]
    assert not missing_blocks, f"no ```text block right after <!-- message: KEY --> at {missing_blocks}"


# --- shell-expanded-inputs -----------------------------------------------------------------------


def annotate(model: Path, inputs: list[str], *options: str):
    args = ["annotate", str(model), *inputs, "--output", "out", "--no-progress", *options]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_shell_expanded_inputs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the paths do not exist: planning stops at the first, after the warning
    inputs = [f"dump/part-{i:05d}.parquet" for i in range(12_000)]
    result = annotate(tiny_model_dir, inputs)
    assert result.exit_code == 1
    warning, error = result.stderr.splitlines()
    assert error == "Error: dump/part-00000.parquet: no such file, or no Parquet files in it"
    assert warning.startswith("nerbatch annotate: warning: the shell passed 12,000 input paths;")
    assert "('dump/*.parquet')" in warning
    assert annotate(tiny_model_dir, inputs[:1000]).stderr.splitlines() == [error]  # 1,000 paths say nothing
    assert_in_docs("shell-expanded-inputs", warning)


def test_shell_expanded_inputs_are_named_by_the_ray_driver_too(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    result = annotate(tiny_model_dir, [f"dump/part-{i:05d}.parquet" for i in range(1001)], "--engine", "ray")
    assert result.exit_code == 1  # planning fails before any cluster starts
    assert result.stderr.count("nerbatch annotate: warning: the shell passed 1,001 input paths") == 1


# --- huge-row-group ------------------------------------------------------------------------------


def write_rows(path: Path, rows: int, row_group: int | None = None) -> None:
    pq.write_table(pa.table({"text": pa.array(["x"] * rows)}), path, row_group_size=row_group)


def test_huge_row_group(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    for index in range(12):
        write_rows(dump / f"part-{index:05d}.parquet", 20_000)
    write_rows(dump / "part-00012.parquet", 1_020_000, row_group=1_000_000)  # row groups of 1,000,000 and 20,000
    units = plan_units(discover_inputs([str(dump)]), ["text"])
    assert len(units) == 14 and max(u.rows for u in units) == 1_000_000
    printed = io.StringIO()
    warn_about_units(units, file=printed)
    message = shown(printed.getvalue(), tmp_path)
    assert message == (
        f"nerbatch annotate: warning: {docs_check.MESSAGE_ROOT}/dump/part-00012.parquet row group 0 holds "
        "1,000,000 rows, 79% of the input and 50 times the median row group (20,000 rows); a row group is one unit "
        "of work, annotated by one process while the others wait once their units are done. Rewrite that file "
        "with smaller row groups: see docs/running-at-scale.md#row-groups-and-units"
    )
    assert_in_docs("huge-row-group", message)


# --- local-out-dir-multinode ---------------------------------------------------------------------


class FakeRay:
    """What `probe_nodes` asks of Ray: `get` the actors' answers (here, the answers themselves)."""

    @staticmethod
    def get(refs):
        return refs


class ActorOnAnotherNode:
    """An actor on node-b, whose OUT_DIR is a local directory of its own: it sees no driver token."""

    class probe:  # noqa: N801 (Ray's actor method handle: `worker.probe.remote(...)`)
        @staticmethod
        def remote(token):
            return {"saw_main": False, "host": "node-b"}


def test_local_out_dir_multinode(tmp_path, monkeypatch):
    """A local OUT_DIR (the same path on each node's own disk): under torchrun, a rank on another
    node than rank 0 does not see rank 0's token; on Ray, the driver hears that an actor did not."""
    from nerbatch.engines.ranks import probe_ranks

    out = RunDir(tmp_path / "out")  # rank 0 on node-a; rank 3 on node-b, whose OUT_DIR is its own disk
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    from nerbatch.engines import probe

    def answers(mine):  # ranks 1 and 2 share rank 0's disk; rank 3 answers from node-b
        nearby = [probe.answer(out, "ranks", f"rank-{r}") for r in (1, 2)]
        return [mine, *nearby, {**probe.node_facts(), "host": "node-b", "saw_main": False}]

    said = iter([answers, lambda verdict: [verdict, None, None, None]])
    with pytest.raises(InputError) as raised:  # what every rank raises: rank 0's verdict, gathered to all
        probe_ranks(out, 0, 4, barrier=lambda: None, gather=lambda value: next(said)(value))
    ranks = shown(as_printed(raised.value), tmp_path)
    assert ranks == (
        f"Error: {docs_check.MESSAGE_ROOT}/out is not shared between rank 0 (node-a) and rank 3 on node-b: a local "
        "directory on each node would scatter the output; use a shared filesystem or an object store URI "
        "(s3://, gs://, ...) for --output"
    )

    ray_actors = pytest.importorskip("nerbatch.engines.ray_actors")
    pytest.importorskip("ray")  # `probe_nodes` reads Ray's exception types
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")  # the driver's host
    with pytest.raises(InputError) as raised:
        ray_actors.probe_nodes(FakeRay(), [ActorOnAnotherNode()], SimpleNamespace(out=out), "token")
    ray = shown(as_printed(raised.value), tmp_path)
    assert ray.startswith(
        f"Error: {docs_check.MESSAGE_ROOT}/out is not shared between the driver (node-a) and actor-0 on node-b: "
    )
    assert not (tmp_path / "out" / "_nerbatch" / "probe" / "token").exists()  # the probe cleans up
    assert_in_docs("local-out-dir-multinode", ranks, ray)


# --- train-resume-process-count ------------------------------------------------------------------


def test_train_resume_process_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(output_dir="runs/conll-bert")
    checkpoint = Path(cfg.output_dir) / "checkpoints" / "step_00000400"
    checkpoint.mkdir(parents=True)
    progress = {"config": cfg.to_dict(), "processes": 8, "epoch": 0, "batches_done": 3200, "global_step": 400}
    (checkpoint / "progress.json").write_text(json.dumps(progress))
    accelerator = SimpleNamespace(num_processes=4, print=print)  # the rerun: 4 processes
    with pytest.raises(ConfigError) as raised:
        restore(accelerator, Path(cfg.output_dir), cfg)
    message = shown(as_printed(raised.value), tmp_path)
    assert message == (
        "Error: cannot resume from runs/conll-bert/checkpoints/step_00000400: it was written by 8 processes, this "
        "run has 4; resume with the same count"
    )
    assert_in_docs("train-resume-process-count", message)


# --- hub-offline ---------------------------------------------------------------------------------


def test_hub_offline(tiny_model_dir, tmp_path, monkeypatch):
    """The reference recipe on a compute node without hub access: the model id fails first; with a
    local model, the hub dataset does. Both are shown (caches emptied: a cached copy would load)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "jobs", "jobs")
    train = ["train", "--config", "jobs/conll2003-bert-base-cased.toml", "--max-train-samples", "8", "--epochs", "1"]
    model = CliRunner().invoke(main, train)
    dataset = CliRunner().invoke(main, [*train, "--model", str(tiny_model_dir)])
    assert model.exit_code == 1 and dataset.exit_code == 1, (model.output, dataset.output)
    lines = [model.stderr.strip().splitlines()[-1], dataset.stderr.strip().splitlines()[-1]]
    assert lines[0].startswith("Error: could not load model 'bert-base-cased': ")
    assert lines[0].endswith(" Pass a local model directory when offline.")
    assert lines[1] == (
        "Error: could not load dataset 'lhoestq/conll2003' split 'train': the hub is not reachable "
        "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); pass local CoNLL/Parquet/JSON Lines files or a downloaded "
        "copy of the dataset (a directory)"
    )
    assert not Path("runs").exists()  # nothing was written
    assert_in_docs("hub-offline", *lines)


def test_a_message_block_is_compared_with_what_is_printed(tmp_path, monkeypatch):
    page = tmp_path / "troubleshooting.md"
    monkeypatch.setattr(docs_check, "doc_files", lambda: [page])
    page.write_text(
        "## Messages\n\n<!-- message: k -->\n```text\nError: one\n```\n\n<!-- message: k -->\n```text\ntwo\n```\n"
    )
    assert docs_check.message_problem("k", "Error: one\n", "two") is None
    assert "replace them with:\n<!-- message: k -->\n```text\nError: one\n```" in docs_check.message_problem(
        "k", "Error: one"
    )
    assert "does not show message 'other'" in docs_check.message_problem("other", "x")
    page.write_text("<!-- message: k -->\n\n```text\nError: one\n```\n")  # not right after the marker
    assert docs_check.message_blocks() == {"k": [(str(page) + ":1", None)]}
