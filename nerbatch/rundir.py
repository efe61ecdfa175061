"""The output directory's bookkeeping: run config and resume checks, completion markers, totals.

OUT_DIR layout::

    part-00000.parquet ...         output files (what analysts read), or with --partition-by
    COLUMN=value/part-00000.parquet  the same split into Hive-style directories
    _nerbatch/config.json          the run's resolved config: a rerun must match it
    _nerbatch/pieces/unit-*.parquet  each done unit's rows, until its output file is assembled
    _nerbatch/done/unit-*.json     completion markers: the unit's stats, its rank and process, when
    _nerbatch/failed/unit-*.json   units that raised, with the error
    _nerbatch/files/part-*.json    output files assembled, with the paths written
    _nerbatch/tmp/                 pieces and files being written
    _nerbatch/stats/rank-*.json    what each rank did in its last run
    _nerbatch/alive/rank-*.json    when each rank last said it was working (ranks wait for each other)
    _nerbatch/stats.json           totals, written once every unit is done and every file assembled

(Spark and Hive skip `_`-prefixed paths; DuckDB's `OUT_DIR/*.parquet` glob does not descend.)
Completion is per unit, never per rank, so a rerun may use any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nerbatch import __version__
from nerbatch.parquet_io import InputError
from nerbatch.shards import Unit
from nerbatch.storage import Location, one_line

META = "_nerbatch"
_OUTPUT_FILE = re.compile(r"part-\d{5}\.parquet")


@dataclass
class Tally:
    """Counts of one unit, one rank or the whole run (added up with `add`)."""

    rows: int = 0
    docs: int = 0
    flagged: int = 0
    tokens: int = 0
    windows: int = 0
    entities: int = 0
    fp32_batches: int = 0  # fp16 batches whose outputs overflowed, run again in fp32
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class RunDir:
    """Paths and state of one OUT_DIR (a local directory or a URI)."""

    def __init__(self, root: Location):
        self.root = root
        self.meta = root / META
        self._last_beat = 0.0

    def piece(self, unit: Unit) -> Location:
        return self.meta / "pieces" / f"{unit.name}.parquet"

    def temporary(self, unit: Unit) -> Location:
        # named by unit only: one rank at a time writes a unit, and a rerun with any number of
        # processes overwrites what a killed run left
        return self.meta / "tmp" / f"{unit.name}.parquet"

    def marker(self, unit: Unit) -> Location:
        return self.meta / "done" / f"{unit.name}.json"

    def failure(self, unit: Unit) -> Location:
        return self.meta / "failed" / f"{unit.name}.json"

    def file_marker(self, name: str) -> Location:
        return self.meta / "files" / f"{name}.json"

    def assembling(self, name: str) -> Location:
        """Where output file `name` (and its partitions) is written before the rename into place."""
        return self.meta / "tmp" / "files" / name

    def is_done(self, unit: Unit) -> bool:
        """The unit's rows are written (its piece is published, or already assembled into its file).
        A failed request raises (fsspec's `exists` would answer False and redo work)."""
        return self.marker(unit).kind() == "file"

    def is_assembled(self, name: str) -> bool:
        return self.file_marker(name).kind() == "file"

    def settled(self, since: float) -> set[str]:
        """Names of the units done, or failed in a run started at or after `since` (fresh listings)."""
        for folder in ("done", "failed"):
            (self.meta / folder).refresh()
        names = {c.name.removesuffix(".json") for c in (self.meta / "done").children()}
        for failure in (self.meta / "failed").children():
            try:
                if failure.read_json().get("at", 0) >= since:
                    names.add(failure.name.removesuffix(".json"))
            except FileNotFoundError:  # its rank redid the unit and cleared the failure meanwhile
                continue
        return names

    def beat(self, rank: int, every: float = 60.0) -> None:
        """Say that `rank` is working (at most every `every` s): ranks waiting for it keep waiting."""
        now = time.time()
        if now - self._last_beat >= every:
            (self.meta / "alive" / f"rank-{rank:05d}.json").write_json({"at": now})
            self._last_beat = now

    def last_beat(self) -> float:
        """The latest time any rank said it was working (0 when none has)."""
        alive = self.meta / "alive"
        alive.refresh()
        times = []
        for beat in alive.children():
            try:
                times.append(beat.read_json()["at"])
            except FileNotFoundError:
                continue
        return max(times, default=0.0)

    def mark_done(self, unit: Unit, stats: dict, rank: int = 0) -> None:
        """Record completion (after the piece is published), by which rank and process and when;
        clears an earlier failure."""
        record = {"unit": asdict(unit), **stats, "rank": rank, "pid": os.getpid(), "at": time.time()}
        self.marker(unit).write_json(record)
        self.failure(unit).remove()

    def mark_failed(self, unit: Unit, error: str) -> None:
        # the time is in the content: object stores' modification times are not comparable with ours
        self.failure(unit).write_json({"unit": asdict(unit), "error": error, "at": time.time()})

    def mark_assembled(self, name: str, units: list[Unit], published: dict) -> None:
        """Record an assembled file, then drop its pieces (the marker makes them redundant)."""
        self.file_marker(name).write_json({"units": [u.index for u in units], **published})
        self.drop_pieces(units)

    def drop_pieces(self, units: list[Unit]) -> None:
        for unit in units:
            self.piece(unit).remove()

    def unit_stats(self, unit: Unit) -> dict:
        return self.marker(unit).read_json()

    def file_record(self, name: str) -> dict:
        return self.file_marker(name).read_json()

    def prepare(self, config: dict, overwrite: bool) -> None:
        """Check OUT_DIR against this run's config (resume), or claim it; `overwrite` clears it first.

        Refuses an OUT_DIR written with another model, options or inputs, and a non-empty directory
        that nerbatch did not write, because mixing them would silently corrupt the output.
        """
        config_path = self.meta / "config.json"
        foreign = self._foreign_children()
        if foreign:
            raise InputError(
                f"{self.root} holds files that `nerbatch annotate` did not write ({', '.join(foreign[:4])}"
                f"{', ...' if len(foreign) > 4 else ''}); choose an empty or new --output directory"
                + (" (--overwrite only replaces an earlier nerbatch output)" if overwrite else "")
            )
        if overwrite and self.root.exists():
            self._clear()
        elif config_path.exists():
            previous = config_path.read_json()
            changed = _differences(previous, as_recorded(config, previous))
            if changed:
                details = "; ".join(f"{k}: was {_short(was)}, now {_short(now)}" for k, was, now in changed)
                raise InputError(
                    f"{self.root} holds output of a different run ({details}). Rerun with the same "
                    "model, options and inputs to resume, choose another --output, or pass --overwrite "
                    "to delete it and start again"
                )
            return
        elif self.root.children():  # ours, without a run config: a crash while --overwrite cleared it
            raise InputError(
                f"{self.root} holds part of an output whose run config is gone; pass --overwrite to "
                "clear it, or choose another --output directory"
            )
        try:
            config_path.write_json(config)
        except Exception as exc:  # no such bucket, no write permission, read-only mount: before any work
            raise one_line(str(self.root), "write the output here", exc) from exc

    def _foreign_children(self) -> list[str]:
        """Names of what is in OUT_DIR besides output files, partition directories of output files
        and hidden names. Writing beside other files would mix them into what readers of the
        directory load, and --overwrite must never delete them."""
        if not self.root.exists():
            return []

        def ours(name: str) -> bool:
            # hidden names (`_nerbatch/`, `.DS_Store`, `_SUCCESS`, `.crc`) are skipped by every reader;
            # `$folder$` objects are Hadoop's directory markers on object stores
            return not name or name.startswith((".", "_")) or "$folder$" in name or bool(_OUTPUT_FILE.fullmatch(name))

        foreign = []
        for child in self.root.children():
            if ours(child.name):
                continue
            if "=" in child.name and child.is_dir() and all(ours(c.name) for c in child.children()):
                continue
            foreign.append(child.name)
        return sorted(foreign)

    def _clear(self) -> None:
        """Delete what nerbatch wrote here: output files (partition directories too) and bookkeeping.

        The run config goes first: a rerun after a crash in here finds a directory that is not ours
        and asks for --overwrite again, instead of resuming a run whose files are half deleted."""
        (self.meta / "config.json").remove()
        for child in self.root.children():
            if _OUTPUT_FILE.fullmatch(child.name):
                child.remove()
            elif "=" in child.name and child.is_dir():  # a partition directory
                for part in child.children():
                    if _OUTPUT_FILE.fullmatch(part.name):
                        part.remove()
                if not child.children():
                    child.remove_tree()
        self.meta.remove_tree()

    def check(self, config: dict) -> None:
        """Fail if OUT_DIR's config is not `config` (non-main ranks, after the main rank prepared it)."""
        previous = (self.meta / "config.json").read_json()
        if previous != as_recorded(config, previous):
            raise InputError(
                f"{self.root}: config.json differs from this process's config; were all processes "
                "started with the same command?"
            )


def run_config(options, units: list[Unit], annotator) -> dict:
    """The facts that determine the output; a rerun into the same OUT_DIR must have the same ones."""
    from nerbatch.modeling import resolve_model

    model = resolve_model(options.model)
    recorded = {
        "text_column": options.text_column,
        "id_column": options.id_column,
        "keep_columns": options.keep_columns,
        "partition_by": options.partition_by,
        "row_group_rows": options.row_group_rows,
        "file_rows": options.file_rows,
        **annotator.settings(),
    }
    if annotator.precision == "int8":  # its spans depend on which windows share a batch (README, Precision)
        recorded |= {
            "batch_size": annotator.batch_size,
            "max_batch_tokens": annotator.max_batch_tokens,
            "read_rows": options.read_rows,
        }
    return {
        "model": str(Path(model).resolve()) if Path(model).exists() else model,
        "model_fingerprint": model_fingerprint(model),
        "labels": annotator.labels,
        "options": recorded,
        "inputs": [[u.path, u.row_group, u.rows] for u in units],
        "input_footers": {u.path: u.footer for u in units},
    }


def as_recorded(config: dict, previous: dict) -> dict:
    """`config` as an OUT_DIR written by `previous` records it: outputs of 0.3.5 and earlier have no
    `input_footers`, and resume on the other keys alone, as they did."""
    return config if "input_footers" in previous else {k: v for k, v in config.items() if k != "input_footers"}


def model_fingerprint(model: str) -> str:
    """A hash of a local model dir: config, tokenizer and every byte of the weights files (a
    sequential read, about a second per GB; two checkpoints of one size can differ anywhere)."""
    root = Path(model)
    if not root.is_dir():
        return model
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.name in {"config.json", "tokenizer.json", "tokenizer_config.json"} or path.suffix in {
            ".safetensors",
            ".bin",
            ".pt",
        }:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def output_metadata(config: dict) -> dict:
    """The key-value metadata of every part file: model, labels, options, nerbatch version."""
    return {"model": config["model"], "labels": config["labels"], "options": config["options"], "version": __version__}


def write_totals_if_complete(out: RunDir, units: list[Unit], files: list[str], config: dict) -> None:
    """Whoever finds every unit done and every file assembled writes the run totals (several may:
    same content, atomic write)."""
    if not all(out.is_done(u) for u in units) or not all(out.is_assembled(name) for name in files):
        return
    total = Tally()
    for unit in units:
        stats = out.unit_stats(unit)
        total.add(Tally(**{k: stats.get(k, 0) for k in vars(Tally())}))  # units done by 0.3.2 lack fp32_batches
    (out.meta / "stats.json").write_json(
        {
            "complete": True,
            "units": len(units),
            "files": sorted(f for name in files for f in out.file_record(name)["files"]),
            **vars(total),
            "model": config["model"],
            "options": config["options"],
        },
    )


def wait_for_other_ranks(
    out: RunDir, units: list[Unit], mine: set, since: float, poll: float = 2.0, stall: float = 1800.0
) -> bool:
    """Wait until every other rank's units have settled (done, or failed in this run): an output
    file may hold units of every rank, and a failing rank must not exit (the launcher would kill
    the others' work in progress). Returns False when it gives up: no unit settled and no rank said
    it was working (`RunDir.beat`) for `stall` seconds, as when a rank died without a trace."""
    others = {u.name for u in units if u not in mine}
    count, changed = -1, time.time()
    while len(settled := out.settled(since) & others) < len(others):
        if len(settled) != count:
            count, changed = len(settled), time.time()
        elif time.time() - max(changed, out.last_beat()) > stall:
            return False
        time.sleep(poll)
    return True


def _differences(previous: dict, config: dict) -> list[tuple[str, object, object]]:
    """(key, was, now) for each key whose value differs; within `options`, each option by name."""
    changed = []
    for key in sorted(set(previous) | set(config)):
        was, now = previous.get(key), config.get(key)
        if was == now:
            continue
        if key == "options" and isinstance(was, dict) and isinstance(now, dict):
            options = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            changed += [(f"option {k}", was.get(k), now.get(k)) for k in options]
        elif key == "inputs" and isinstance(was, list) and isinstance(now, list):
            changed.append(_first_input_difference(was, now))
        elif key == "input_footers" and isinstance(was, dict) and isinstance(now, dict):
            path = next(p for p in sorted(set(was) | set(now)) if was.get(p) != now.get(p))
            changed.append((f"input {path} (its content: the Parquet footer)", was.get(path), now.get(path)))
        else:
            changed.append((key, was, now))
    return changed


def _first_input_difference(was: list, now: list) -> tuple[str, object, object]:
    """The first unit (file, row group, rows) that differs between two runs' inputs, named."""
    for index in range(max(len(was), len(now))):
        before = was[index] if index < len(was) else None
        after = now[index] if index < len(now) else None
        if before != after:
            return f"inputs ({len(was)} units, now {len(now)}; unit {index} is the first to differ)", before, after
    return "inputs", was, now


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."
