"""Work splitting and bookkeeping: input discovery, units, rank assignment, completion markers, resume.

A unit is one row group of a multi-row-group file, or a whole file. Units are numbered in a fixed
order (sorted paths, then row groups), so unit N and its part file `part-N.parquet` are the same
whatever the number of processes; rank r of w takes `units[r::w]` with no coordination.

OUT_DIR layout::

    part-000000.parquet ...      published parts (what analysts read)
    _nerbatch/config.json        the run's resolved config: a rerun must match it
    _nerbatch/done/part-*.json   completion markers, with the unit's stats
    _nerbatch/failed/part-*.json units that raised, with the error
    _nerbatch/tmp/               parts being written
    _nerbatch/stats.json         totals, written once every unit is done

(Spark and Hive skip `_`-prefixed paths; DuckDB's `OUT_DIR/*.parquet` glob does not descend.)
"""

from __future__ import annotations

import glob
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from nerbatch.parquet_io import InputError, open_parquet, write_json_atomic

META = "_nerbatch"


@dataclass(frozen=True)
class Unit:
    index: int
    path: str
    row_group: int | None  # None: the whole file
    first_row: int  # index in the file of the unit's first row
    rows: int

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"

    def describe(self) -> str:
        where = "" if self.row_group is None else f" row group {self.row_group}"
        return f"{self.path}{where}"


def discover_inputs(inputs: list[str], exclude: Path | None = None) -> list[Path]:
    """Parquet files named by `inputs` (files, directories searched recursively, or glob patterns), sorted.

    Files under `exclude` (the output directory) are skipped: an OUT_DIR inside an input directory
    must not feed a rerun its own parts.
    """
    skip = exclude.resolve() if exclude is not None else None
    found: set[Path] = set()
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            matches = [p for p in path.rglob("*.parquet") if not _hidden(p.relative_to(path))]
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        matches = [p.resolve() for p in matches]
        matches = [p for p in matches if skip is None or not p.is_relative_to(skip)]
        if not matches:
            raise InputError(f"{spec}: no such file, or no Parquet files in it")
        found.update(matches)
    return sorted(found)


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def plan_units(files: list[Path], columns: list[str]) -> list[Unit]:
    """Read every footer, check that `columns` exist, and number the units. Fails before any work."""
    units: list[Unit] = []
    for path in files:
        meta = open_parquet(path).metadata
        names = meta.schema.to_arrow_schema().names
        for column in columns:
            if column not in names:
                raise InputError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
        if meta.num_row_groups <= 1:
            units.append(Unit(len(units), str(path), None, 0, meta.num_rows))
            continue
        first = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(Unit(len(units), str(path), group, first, rows))
            first += rows
    return units


def units_for_rank(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """The units rank `rank` of `world` processes: every world-th unit, starting at its rank."""
    return units[rank::world]


class RunDir:
    """Paths and state of one OUT_DIR."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = self.root / META

    def part(self, unit: Unit) -> Path:
        return self.root / f"{unit.name}.parquet"

    def temporary(self, unit: Unit, rank: int) -> Path:
        return self.meta / "tmp" / f"{unit.name}.rank{rank}.parquet"

    def marker(self, unit: Unit) -> Path:
        return self.meta / "done" / f"{unit.name}.json"

    def failure(self, unit: Unit) -> Path:
        return self.meta / "failed" / f"{unit.name}.json"

    def is_done(self, unit: Unit) -> bool:
        return self.marker(unit).exists() and self.part(unit).exists()

    def mark_done(self, unit: Unit, stats: dict) -> None:
        """Record completion (after the part is published); clears an earlier failure."""
        write_json_atomic(self.marker(unit), {"unit": asdict(unit), **stats})
        self.failure(unit).unlink(missing_ok=True)

    def mark_failed(self, unit: Unit, error: str) -> None:
        write_json_atomic(self.failure(unit), {"unit": asdict(unit), "error": error})

    def unit_stats(self, unit: Unit) -> dict:
        return json.loads(self.marker(unit).read_text(encoding="utf-8"))

    def prepare(self, config: dict, overwrite: bool) -> None:
        """Check OUT_DIR against this run's config (resume), or claim it; `overwrite` clears it first.

        Refuses an OUT_DIR written with another model, options or inputs, and a non-empty directory
        that nerbatch did not write, because mixing them would silently corrupt the output.
        """
        config_path = self.meta / "config.json"
        if overwrite and self.root.exists():
            for part in self.root.glob("part-*.parquet"):
                part.unlink()
            shutil.rmtree(self.meta, ignore_errors=True)
        elif config_path.exists():
            previous = json.loads(config_path.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            if changed:
                details = "; ".join(f"{k}: was {_short(previous.get(k))}, now {_short(config.get(k))}" for k in changed)
                raise InputError(f"{self.root} holds output of a different run ({details}). Rerun with the same "
                                 "model, options and inputs to resume, choose another --output, or pass --overwrite "
                                 "to delete it and start again")
            return
        elif self.root.exists() and any(self.root.iterdir()):
            raise InputError(f"{self.root} is not empty and was not written by `nerbatch annotate`; choose an empty "
                             "or new --output directory, or pass --overwrite")
        write_json_atomic(config_path, config)

    def check(self, config: dict) -> None:
        """Fail if OUT_DIR's config is not `config` (non-main ranks, after the main rank prepared it)."""
        previous = json.loads((self.meta / "config.json").read_text(encoding="utf-8"))
        if previous != config:
            raise InputError(f"{self.root}: config.json differs from this process's config; were all processes "
                             "started with the same command?")


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."
