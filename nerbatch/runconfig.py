"""A run's config: the facts that determine annotate's output, and how two runs' configs differ.

`OUT_DIR/_nerbatch/config.json` holds the config of the run that wrote it (`nerbatch.rundir`); a rerun
into the same directory resumes only when its own config is the same (`changes`), so that one output
never mixes two models, two option sets or two versions of an input. The part files carry the part
of it that readers need (`output_metadata`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from nerbatch import __version__
from nerbatch.shards import Unit

# What the run config records for the reader but a rerun need not match: why its precision was chosen
# and what ran it (a requeue onto another CPU type keeps the precision, `nerbatch.autoprecision`).
INFORMATIONAL = "precision_choice"


def run_config(options, units: list[Unit], tagger) -> dict:
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
        **tagger.settings(),
    }
    if tagger.precision == "int8":  # its spans depend on which windows share a batch (dynamic scales)
        recorded |= {
            "batch_size": tagger.batch_size,
            "max_batch_tokens": tagger.max_batch_tokens,
            "read_rows": options.read_rows,
        }
    config = {
        "model": str(Path(model).resolve()) if Path(model).exists() else model,
        "model_fingerprint": model_fingerprint(model),
        "labels": tagger.labels,
        "options": recorded,
        "inputs": [[u.path, u.row_group, u.rows] for u in units],
        "input_footers": {u.path: u.footer for u in units},
    }
    if tagger.choice is not None:
        config[INFORMATIONAL] = tagger.choice.record()
    return config


def as_recorded(config: dict, previous: dict) -> dict:
    """`config` as an OUT_DIR written by `previous` records it: an output whose config has no
    `input_footers` (written before footers were recorded) resumes on the other keys alone."""
    return config if "input_footers" in previous else {k: v for k, v in config.items() if k != "input_footers"}


def model_fingerprint(model: str) -> str:
    """A hash of a local model dir: config, tokenizer and every byte of the weights files (a
    sequential read, about a second per GB; two checkpoints of one size can differ anywhere)."""
    root = Path(model)
    if not root.is_dir():
        return model
    files = [
        path
        for path in sorted(root.iterdir())
        if path.name in {"config.json", "tokenizer.json", "tokenizer_config.json"}
        or path.suffix in {".safetensors", ".bin", ".pt"}
    ]
    # read once per process (the precision choice and the run config both ask) unless a file changed
    return _hash_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def output_metadata(config: dict) -> dict:
    """The key-value metadata of every part file: model, labels, options, nerbatch version."""
    metadata = {"model": config["model"], "labels": config["labels"], "options": config["options"]}
    if INFORMATIONAL in config:
        metadata[INFORMATIONAL] = config[INFORMATIONAL]
    return metadata | {"version": __version__}


def changes(previous: dict, config: dict) -> str:
    """How `config` differs from the `previous` run's, as one line (`key: was X, now Y; ...`);
    empty when a rerun may resume."""
    changed = _differences(_compared(previous), _compared(as_recorded(config, previous)))
    return "; ".join(f"{key}: was {_short(was)}, now {_short(now)}" for key, was, now in changed)


def _compared(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != INFORMATIONAL}


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
