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
    _nerbatch/stats/rank-*.json    what each rank (or actor-*) did in its last run
    _nerbatch/alive/rank-*.json    when each rank last said it was working (ranks wait for each other)
    _nerbatch/driver.json          the Ray driver's claim on OUT_DIR while it runs
    _nerbatch/probe/TOKEN/         the multi-node check's tokens while a run starts
    _nerbatch/stats.json           totals, written once every unit is done and every file assembled

(Spark and Hive skip `_`-prefixed paths; DuckDB's `OUT_DIR/*.parquet` glob does not descend.)
Completion is per unit, never per rank, so a rerun may use any number of processes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nerbatch.errors import NerbatchError
from nerbatch.parquet_io import InputError
from nerbatch.runconfig import changes
from nerbatch.shards import Unit, unit_name
from nerbatch.storage import Location, locate, one_line

META = "_nerbatch"
_OUTPUT_FILE = re.compile(r"part-\d{5}\.parquet")


class ReportError(NerbatchError):
    """An OUT_DIR that cannot be read back (not an annotate output, or changed since); the message
    names the path."""


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


@dataclass
class UnitState:
    """One unit of a run (an input file or row group) and what the bookkeeping says of it."""

    name: str
    path: str
    row_group: int | None
    rows: int
    state: str  # "done", "failed" or "missing"
    error: str | None = None

    def describe(self) -> str:
        return self.path if self.row_group is None else f"{self.path} row group {self.row_group}"


@dataclass
class Run:
    """What `_nerbatch/` records: the run's config, every unit's state, each rank's last figures."""

    config: dict
    units: list[UnitState]
    ranks: list[dict]


class RunDir:
    """Paths and state of one OUT_DIR (a local directory or a URI): the only code that knows the
    layout of `_nerbatch/`."""

    def __init__(self, root: Location | str | Path):
        self.root = root if isinstance(root, Location) else locate(root)
        self.meta = self.root / META
        self.totals = self.meta / "stats.json"
        self._last_beat = 0.0

    def piece(self, unit: Unit) -> Location:
        return self.meta / "pieces" / f"{unit.name}.parquet"

    def temporary(self, unit: Unit, attempt: str) -> Location:
        """Where one attempt at `unit` writes its piece before the move into place: a name of its own,
        so that two attempts (a retry beside a stale one) never write the same file."""
        return self.meta / "tmp" / f"{unit.name}.{attempt}.parquet"

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
        if self.is_done(unit):  # a late duplicate of a unit another attempt finished: written once
            return
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

    def write_worker_stats(self, kind: str, index: int, world: int, figures: dict) -> None:
        """Record what worker `index` of `world` (a "rank" or an "actor") did in this run (`nerbatch
        stats` shows each one's last run)."""
        (self.meta / "stats" / f"{kind}-{index:05d}-of-{world:05d}.json").write_json(figures)

    def is_complete(self) -> bool:
        """The run totals are written: every unit is done and every output file assembled."""
        return self.totals.is_file()

    # --- reading a run back (`nerbatch stats`, `nerbatch show`); nothing here writes

    def read_run(self) -> Run:
        """The bookkeeping; a `ReportError` when OUT_DIR is not an annotate output.

        Units are the config's "inputs" in order. A done or failed marker is matched to its unit by the
        input path and row group it records, not by its file name, so renaming the markers is harmless.
        """
        config = self._read_config()
        done = {_unit_key(marker) for marker in _read_markers(self.meta / "done")}
        failed = {_unit_key(marker): marker.get("error", "") for marker in _read_markers(self.meta / "failed")}
        units = []
        for index, (path, row_group, rows) in enumerate(config["inputs"]):
            key = (path, row_group)
            state = "done" if key in done else "failed" if key in failed else "missing"
            error = failed[key] if state == "failed" else None
            units.append(UnitState(unit_name(index), path, row_group, rows, state, error))
        ranks = [_rank_figures(p) for p in _json_files(self.meta / "stats") if p.name.startswith(("rank-", "actor-"))]
        return Run(config, units, ranks)

    def _read_config(self) -> dict:
        path = self.meta / "config.json"
        if not self.root.is_dir():
            raise ReportError(f"{self.root}: no such directory")
        if not path.is_file():
            raise ReportError(f"{self.root}: not a `nerbatch annotate` output directory (no {META}/config.json)")
        try:
            config = path.read_json()
        except (OSError, ValueError) as exc:
            raise ReportError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(config, dict) or not {"inputs", "options"} <= config.keys():
            raise ReportError(f"{path}: not the config of a `nerbatch annotate` run (no inputs or options)")
        return config

    def output_files(self) -> list[Location]:
        """Every `*.parquet` under OUT_DIR, sorted, except under a path component starting with `_` or
        `.` (what Spark and Hive read), in the root or in `key=value` subdirectories."""
        return [
            path
            for path in self.root.find(".parquet")
            if not any(part.startswith(("_", ".")) for part in path.relative_to(self.root).split("/"))
        ]

    def written_files(self) -> list[Location]:
        """The output files, then the pieces of done units whose output file is not assembled yet
        (an incomplete run): together, every row written so far, each once. A piece whose file is
        already recorded is left out: a crash between recording a file and dropping its pieces leaves
        such pieces behind (the next run drops them)."""
        assembled = {
            unit_name(index) + ".parquet"
            for marker in (self.meta / "files").find(".json")
            for index in marker.read_json()["units"]
        }
        # a piece published by a process killed before it marked its unit done is not counted: the
        # unit is missing, and the rerun that redoes it publishes the piece again
        done = {marker.name.removesuffix(".json") + ".parquet" for marker in (self.meta / "done").find(".json")}
        pieces = (self.meta / "pieces").find(".parquet")
        return self.output_files() + [p for p in pieces if p.name in done and p.name not in assembled]

    # --- writing

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
            details = changes(config_path.read_json(), config)
            if details:
                raise InputError(
                    f"{self.root} holds output of a different run ({details}). Rerun with the same "
                    "model, options and inputs to resume, choose another --output, or pass --overwrite "
                    "to delete it and start again"
                )
            self.drop_temporaries()
            return
        elif self._holds_output():  # ours, without a run config: a crash while --overwrite cleared it
            raise InputError(
                f"{self.root} holds part of an output whose run config is gone; pass --overwrite to "
                "clear it, or choose another --output directory"
            )
        try:
            self.drop_temporaries()
            config_path.write_json(config)
        except Exception as exc:  # no such bucket, no write permission, read-only mount: before any work
            raise one_line(str(self.root), "write the output here", exc) from exc

    def _holds_output(self) -> bool:
        """Whether OUT_DIR holds anything besides a driver's claim (made before the run config)."""
        for child in self.root.children():
            if child.name != META or any(c.name != "driver.json" for c in child.children()):
                return True
        return False

    def drop_temporaries(self) -> None:
        """Delete what attempts of an earlier run left half written (`temporary`): nothing writes
        while the run is prepared, and each attempt's names are its own, so they would pile up."""
        tmp = self.meta / "tmp"
        if tmp.exists():
            tmp.remove_tree()

    # --- one driver at a time (the Ray engine), and what every node must see

    def claim_driver(self, token: str, stale_after: float = 90.0) -> None:
        """Record that the driver `token` runs this OUT_DIR; refuse when another driver's claim is
        fresher than `stale_after` seconds (`refresh_driver` renews it). The claim is written, then
        read back, so of two drivers starting together the one whose write lost also refuses."""
        lock = self.meta / "driver.json"
        if lock.is_file():
            held = lock.read_json()
            if held.get("token") != token and time.time() - held.get("at", 0) < stale_after and _alive(held):
                raise InputError(
                    f"{self.root}: another driver is running this output (host {held.get('host')}, pid "
                    f"{held.get('pid')}); wait for it to finish, or stop it, before running the same command"
                )
        self.refresh_driver(token)
        time.sleep(0.5)
        if lock.read_json().get("token") != token:
            raise InputError(f"{self.root}: another driver started on this output at the same time")

    def refresh_driver(self, token: str) -> None:
        import socket

        record = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
        (self.meta / "driver.json").write_json(record)

    def release_driver(self, token: str) -> None:
        lock = self.meta / "driver.json"
        if lock.is_file() and lock.read_json().get("token") == token:
            lock.remove()

    def write_probe(self, token: str, who: str, facts: dict) -> None:
        """Leave a token where the other side of a multi-node run must find it (`read_probe`)."""
        (self.meta / "probe" / token / f"{who}.json").write_json(facts)

    def read_probe(self, token: str, who: str) -> dict | None:
        """What `who` wrote for `token`, or None when this process cannot see it."""
        found = self.meta / "probe" / token / f"{who}.json"
        found.refresh()
        return found.read_json() if found.is_file() else None

    def drop_probe(self, token: str) -> None:
        probe = self.meta / "probe" / token
        if probe.exists():
            probe.remove_tree()

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

    def recorded_precision(self) -> tuple[str | None, dict | None]:
        """The precision the run in OUT_DIR was written at and the record of how it was chosen and
        which kernel ran it (None for a run before 0.5.0); (None, None) when there is no run yet."""
        path = self.meta / "config.json"
        if not path.exists():
            return None, None
        config = path.read_json()
        return config.get("options", {}).get("precision"), config.get("precision_choice")

    def check(self, config: dict) -> None:
        """Fail if OUT_DIR's config is not `config` (non-main ranks, after the main rank prepared it)."""
        previous = (self.meta / "config.json").read_json()
        if changes(previous, config):
            raise InputError(
                f"{self.root}: config.json differs from this process's config; were all processes "
                "started with the same command?"
            )


def write_totals_if_complete(out: RunDir, units: list[Unit], files: list[str], config: dict) -> None:
    """Whoever finds every unit done and every file assembled writes the run totals (several may:
    same content, atomic write)."""
    if not all(out.is_done(u) for u in units) or not all(out.is_assembled(name) for name in files):
        return
    total = Tally()
    for unit in units:
        stats = out.unit_stats(unit)
        total.add(Tally(**{k: stats.get(k, 0) for k in vars(Tally())}))  # older markers lack fp32_batches
    out.totals.write_json(
        {
            "complete": True,
            "units": len(units),
            "files": sorted(f for name in files for f in out.file_record(name)["files"]),
            **vars(total),
            "model": config["model"],
            "options": config["options"],
        },
    )


def _json_files(directory: Location) -> list[Location]:
    return [path for path in directory.children() if path.name.endswith(".json")]


def _read_markers(directory: Location):
    for path in _json_files(directory):
        yield path.read_json()


def _unit_key(marker: dict) -> tuple[str, int | None]:
    return marker["unit"]["path"], marker["unit"]["row_group"]


def _rank_figures(path: Location) -> dict:
    rank, world = map(int, re.findall(r"\d+", path.name)[:2])
    figures = path.read_json()
    seconds = figures["wall_seconds"]
    return {
        "kind": path.name.split("-")[0],
        "rank": rank,
        "world": world,
        "units": figures["units"],
        "rows": figures["rows"],
        "tokens": figures["tokens"],
        "wall_seconds": seconds,
        "docs_per_second": figures["rows"] / seconds if seconds else 0.0,
        "tokens_per_second": figures["tokens"] / seconds if seconds else 0.0,
        "failed": len(figures["failed"]),
        "peak_rss_mb": figures.get("peak_rss_mb"),  # absent in the stats of runs before 0.4.0
    }


def _alive(claim: dict) -> bool:
    """Whether the process of a driver's claim may still run: on another host, it may; on this one,
    only if its pid exists (a driver killed a moment ago leaves a fresh claim behind)."""
    import socket

    if claim.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(claim.get("pid", 0)), 0)
    except (OSError, ValueError):
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (what a worker reports in its stats)."""
    import resource

    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux (bytes on macOS)
    return kilobytes / (1024 if sys.platform != "darwin" else 2**20)
