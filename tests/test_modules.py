"""Fast tests of single modules: no subprocess, no model, no shared data (each runs in milliseconds)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nerbatch.align import Encoded, Feature
from nerbatch.batching import LengthGroupedBatches, make_loader
from nerbatch.dist import LaunchError, barrier, check_world, describe, launch_command, process_state, shares_gpus
from nerbatch.errors import NerbatchError
from nerbatch.parquet_io import InputError, PartWriter, output_schema
from nerbatch.prefetch import prefetch
from nerbatch.rundir import RunDir
from nerbatch.shards import discover_inputs, plan_units, units_for_rank
from nerbatch.storage import locate

# -- shards: inputs, units, ranks


def write_parquet(path: Path, rows: int, row_group: int | None = None, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": [f"text {i}" for i in range(rows)], **columns})
    pq.write_table(table, path, row_group_size=row_group)
    return path


def test_inputs_are_discovered_sorted_without_hidden_files_or_the_output(tmp_path):
    b = write_parquet(tmp_path / "in" / "b.parquet", 3)
    a = write_parquet(tmp_path / "in" / "sub" / "a.parquet", 3)
    write_parquet(tmp_path / "in" / ".hidden" / "c.parquet", 3)
    write_parquet(tmp_path / "in" / "_tmp" / "d.parquet", 3)
    write_parquet(tmp_path / "in" / "out" / "part-000000.parquet", 3)  # an OUT_DIR inside the input directory
    found = discover_inputs([str(tmp_path / "in"), str(b)], exclude=locate(tmp_path / "in" / "out"))
    assert [f.uri for f in found] == sorted([str(a.resolve()), str(b.resolve())])
    assert [f.uri for f in discover_inputs([str(tmp_path / "in" / "*.parquet")])] == [str(b.resolve())]
    assert [f.uri for f in discover_inputs([f"file://{tmp_path}/in/**/a.parquet"])] == [str(a.resolve())]
    with pytest.raises(InputError, match="no such file"):
        discover_inputs([str(tmp_path / "missing")])


def test_units_are_row_groups_numbered_in_a_fixed_order(tmp_path):
    one = write_parquet(tmp_path / "a.parquet", 10, row_group=4)  # 3 row groups
    two = write_parquet(tmp_path / "b.parquet", 5)  # 1 row group: the whole file
    units = plan_units([locate(one), locate(two)], ["text"])
    assert [(u.index, Path(u.path).name, u.row_group, u.first_row, u.rows) for u in units] == [
        (0, "a.parquet", 0, 0, 4),
        (1, "a.parquet", 1, 4, 4),
        (2, "a.parquet", 2, 8, 2),
        (3, "b.parquet", None, 0, 5),
    ]
    assert [u.index for u in units_for_rank(units, 1, 3)] == [1]
    assert sorted(u.index for r in range(3) for u in units_for_rank(units, r, 3)) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="no column 'body'"):
        plan_units([locate(one)], ["body"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        plan_units([locate(tmp_path / "bad.parquet")], ["text"])


def test_run_dir_refuses_another_run_and_foreign_files(tmp_path):
    out = RunDir(locate(tmp_path / "out"))
    config = {"model": "m", "options": {"stride": 8}, "inputs": [["a", None, 3]]}
    out.prepare(config, overwrite=False)
    out.prepare(config, overwrite=False)  # the same run resumes
    with pytest.raises(InputError, match="different run .option stride: was 8, now 16"):
        out.prepare({**config, "options": {"stride": 16}}, overwrite=False)
    with pytest.raises(InputError, match="same command"):
        out.check({**config, "model": "other"})
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / "out" / "lang=en").mkdir()
    (tmp_path / "out" / "lang=en" / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / "out" / "spark").mkdir()  # not ours: output files beside it would be read with it
    (tmp_path / "out" / "spark" / "part-00000-1f2e.snappy.parquet").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"holds files that `nerbatch annotate` did not write \(spark\)"):
            out.prepare({**config, "model": "other"}, overwrite=overwrite)
    assert sorted(c.name for c in out.root.children()) == ["_nerbatch", "lang=en", "part-00000.parquet", "spark"]
    (tmp_path / "out" / "spark" / "part-00000-1f2e.snappy.parquet").unlink()
    (tmp_path / "out" / "spark").rmdir()
    out.prepare({**config, "model": "other"}, overwrite=True)  # --overwrite clears files and bookkeeping
    assert sorted(c.name for c in out.root.children()) == ["_nerbatch"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not write \\(notes.txt\\); choose an empty or new --output directory$"):
        RunDir(locate(foreign)).prepare(config, overwrite=False)


def test_waiting_for_other_ranks_ends_when_their_units_settle_or_gives_up_on_silence(tmp_path):
    from nerbatch.rundir import wait_for_other_ranks
    from nerbatch.shards import Unit

    out = RunDir(locate(tmp_path / "out"))
    units = [Unit(i, "a.parquet", i, 10 * i, 10) for i in range(3)]
    mine = {units[0]}
    started = time.time()
    assert not wait_for_other_ranks(out, units, mine, started, poll=0.01, stall=0.2)  # nobody works: give up
    out.mark_done(units[1], {})
    out.mark_failed(units[2], "an earlier run's failure")
    (out.meta / "failed" / "unit-000002.json").write_json({"error": "old", "at": started - 60})
    assert not wait_for_other_ranks(out, units, mine, started, poll=0.01, stall=0.2)  # a stale failure is not news
    out.mark_failed(units[2], "this run's failure")
    assert wait_for_other_ranks(out, units, mine, started, poll=0.01, stall=0.2)


# -- parquet_io: atomic parts


def test_part_is_invisible_until_published_and_abandon_leaves_nothing(tmp_path):
    schema = output_schema([pa.field("id", pa.int64())], {"version": "test"})
    final, temporary = tmp_path / "part-000000.parquet", tmp_path / "tmp" / "part-000000.rank0.parquet"
    writer = PartWriter(locate(final), locate(temporary), schema)
    writer.write({"id": [1, 2], "entities": [[], []], "error": [None, "empty text"], "n_windows": [1, 0]})
    assert temporary.exists() and not final.exists()
    writer.publish()
    assert final.exists() and not temporary.exists()
    assert pq.read_table(final)["error"].to_pylist() == [None, "empty text"]
    other = PartWriter(
        locate(tmp_path / "part-000001.parquet"), locate(tmp_path / "tmp" / "part-000001.rank0.parquet"), schema
    )
    other.write({"id": [3], "entities": [[]], "error": [None], "n_windows": [1]})
    other.abandon()
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == ["part-000000.parquet"]


def test_output_arrays_from_python_lists_equal_pyarrows_own():
    """`from_pylist` (buffers, no pandas import) builds what `pa.array` builds, nulls and non-ASCII included."""
    from nerbatch.parquet_io import ENTITIES, from_pylist

    entities = [
        [],
        [{"start": 0, "end": 3, "label": "PER", "text": "Zoë", "score": 0.5}],
        [
            {"start": 5, "end": 8, "label": "LOC", "text": "東京都", "score": 0.25},
            {"start": 9, "end": 9, "label": "MISC", "text": "", "score": 1.0},
        ],
        [],
    ]
    cases = [
        (entities, ENTITIES),
        ([None, "a", "ü€", None, ""], pa.string()),
        ([3, None, -1], pa.int32()),
        ([0, 2**40], pa.int64()),
        ([0.5, None], pa.float32()),
        ([], pa.string()),
        ([[]], ENTITIES),
    ]
    for values, kind in cases:
        built = from_pylist(values, kind)
        built.validate(full=True)
        assert built.equals(pa.array(values, type=kind)), (values, kind)
        assert built.to_pylist() == values


def test_offsets_past_arrows_int32_limit_are_an_error():
    from nerbatch.errors import NerbatchError
    from nerbatch.parquet_io import _offsets

    assert _offsets([b"ab", b"", b"c"]).tolist() == [0, 2, 2, 3]
    with pytest.raises(NerbatchError, match="2 GiB"):
        _offsets([range(2**31)])  # a range has a length without the memory


# -- prefetch: errors cross the thread, early exits stop it


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


# -- batching: deterministic, length-grouped


def test_batches_depend_only_on_seed_and_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, 16, seed=7)
    first = list(sampler)
    assert list(LengthGroupedBatches(lengths, 16, seed=7)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    assert len(first[-1]) == 1000 % 16 and len(first) == len(sampler)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 5  # grouped: a batch holds similar lengths (random batches would spread ~45)


def test_eval_loader_keeps_order():
    features = [Feature(list(range(n)), [0] * n, k, 0, n, list(range(n))) for k, n in enumerate([5, 3, 8])]
    loader = make_loader(Encoded(features, 0), lambda items: items, 2, 0, train=False, group=False)
    assert [[len(x["input_ids"]) for x in batch] for batch in loader] == [[5, 3], [8]]


# -- dist and errors


def test_launcher_and_accelerate_must_agree(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world(2)
    with pytest.raises(LaunchError, match="started 2 processes but accelerate sees 1"):
        check_world(1)
    assert describe(1) == "1 process" and describe(3) == "3 processes"
    command = launch_command(2, port=29123)
    assert command[0] == sys.executable and "--multi_gpu" in command  # torchrun: real processes on CPU too
    assert command[command.index("--num_processes") + 1] == "2" and command[-1] == "29123"


@pytest.mark.parametrize("gpus, local_processes, shared", [(0, 4, False), (1, 1, False), (1, 4, True), (8, 8, False)])
def test_processes_share_gpus_only_when_a_machine_runs_more_than_it_has(monkeypatch, gpus, local_processes, shared):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert shares_gpus() is shared


def test_the_group_backend_is_passed_only_under_a_launcher(monkeypatch):
    import accelerate

    asked = []

    class State:  # records what accelerate was asked for
        num_processes = 1

        def __init__(self, cpu, backend):
            asked.append(backend)

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    process_state(backend="gloo")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    process_state(backend="gloo")
    assert asked == [None, "gloo"]


def test_a_lone_process_passes_the_barrier_at_once():
    waited = []

    class State:
        def wait_for_everyone(self):
            waited.append(True)

    barrier(State())  # no process group: accelerate's own wait, a no-op for one process
    assert waited == [True]


def test_every_user_error_is_a_nerbatch_error():
    from nerbatch.annotate import UnitsFailed
    from nerbatch.config import ConfigError
    from nerbatch.data import DataError
    from nerbatch.errors import OptionError
    from nerbatch.modeling import ModelError

    for error in (ConfigError, DataError, InputError, LaunchError, ModelError, OptionError, UnitsFailed):
        assert issubclass(error, NerbatchError), error


def test_a_checkpoint_from_before_a_config_key_existed_still_resumes(tmp_path):
    from nerbatch.config import ConfigError, TrainConfig
    from nerbatch.train import check_resumable

    cfg = TrainConfig(output_dir=str(tmp_path))
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("context", "context_window", "select_by")}
    check_resumable(saved, cfg, tmp_path)  # 0.1.0 checkpoints lack the new keys: they ran with the defaults
    with pytest.raises(ConfigError, match="context: 'sentence' -> 'document'"):
        check_resumable(saved, TrainConfig(output_dir=str(tmp_path), context="document"), tmp_path)


def test_hidden_files_and_hadoop_markers_in_partitions_are_not_foreign(tmp_path):
    out = RunDir(locate(tmp_path / "out"))
    config = {"model": "m", "options": {}, "inputs": [["a", None, 3]]}
    out.prepare(config, overwrite=False)
    (tmp_path / "out" / "lang=en").mkdir()
    for name in ("part-00000.parquet", ".part-00000.parquet.crc", "_SUCCESS"):
        (tmp_path / "out" / "lang=en" / name).write_bytes(b"x")
    (tmp_path / "out" / "lang=en_$folder$").write_bytes(b"")
    out.prepare(config, overwrite=False)  # resumes
