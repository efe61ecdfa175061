"""Job configuration: a dataclass of defaults, TOML job files, and command-line overrides.

A job file is a flat TOML table whose keys are `TrainConfig` fields. Unknown keys and values of the
wrong type are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from nerbatch.errors import NerbatchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(NerbatchError):
    """An invalid job file or option; the message names the file and key."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the reference recipe."""

    model: str = "bert-base-cased"
    train: str = "lhoestq/conll2003"  # a hub dataset (split "train") or a local file (nerbatch.data)
    validation: str = "lhoestq/conll2003"  # a hub dataset (split "validation") or a local file
    output_dir: str = "runs/bert-base-cased-conll2003"
    epochs: int = 3
    batch_size: int = 8  # per process
    eval_batch_size: int = 32
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # fraction of optimizer steps with linear warm-up
    max_length: int | None = None  # subwords per feature; default: the model's limit
    seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    gradient_accumulation_steps: int = 1
    # a batch of more subwords (rows x padded length) runs in row slices: the same gradient, the
    # activations of a slice at a time (peak memory); 0: whole batches
    micro_batch_tokens: int = 0
    label_all_subwords: bool = True  # False: continuation subwords get -100
    group_by_length: bool = False  # batches of similar length (less padding)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: epoch ends only
    keep_checkpoints: int = 2
    context: str = "sentence"  # "document": also train on windows of neighbouring sentences (nerbatch.context)
    context_window: int = 256  # document context: longest window, special tokens included; annotate's default
    # document context: the share of sentences also trained on their own in an epoch, drawn anew
    # each epoch; every sentence is in a window every epoch
    lone_share: float = 1.0
    select_by: str = "auto"  # best epoch by "document" or "sentence" validation F1; auto: document when possible
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    document_column: str | None = None  # Parquet/JSON Lines: the column naming each row's document
    report_to: str | None = None  # an accelerate tracker: tensorboard, wandb, ...
    check_int8: bool = True  # at the end, the best model's int8 check (nerbatch.autoprecision), on CPU

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Build a `TrainConfig` from a TOML job file (optional) with `overrides` applied on top.

    `overrides` holds command-line values; None means "not given" and leaves the file's value.
    """
    values: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(values, source=str(path or "command line"))


def build_config(values: dict, source: str = "config") -> TrainConfig:
    """Validate keys and types of `values` and return the config."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        if not _matches(value, hints[key]):
            raise ConfigError(f"{source}: {key} = {value!r} should be {_describe(hints[key])}")
        if hints[key] in (float, float | None) and isinstance(value, int):
            values[key] = float(value)
    cfg = TrainConfig(**values)
    check_ranges(cfg, source)
    return cfg


def check_ranges(cfg: TrainConfig, source: str) -> None:
    """Values of the right type that still cannot work (a zero batch size, a warm-up over 100%...)."""
    positive = ["epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "keep_checkpoints"]
    for key in positive + ["max_length", "max_train_samples", "max_eval_samples"]:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: {key} = {value} must be at least 1")
    negatives = [("checkpoint_every", cfg.checkpoint_every), ("weight_decay", cfg.weight_decay)]
    for key, value in negatives + [("micro_batch_tokens", cfg.micro_batch_tokens)]:
        if value < 0:
            raise ConfigError(f"{source}: {key} = {value} must not be negative")
    choices = {"context": ("sentence", "document"), "select_by": ("auto", "document", "sentence")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{source}: {key} = {getattr(cfg, key)!r} must be one of {', '.join(allowed)}")
    too_long = cfg.context == "document" and cfg.max_length is not None and cfg.context_window > cfg.max_length
    if cfg.context_window < 16 or too_long:
        limit = f" and at most max_length ({cfg.max_length})" if too_long else ""
        raise ConfigError(f"{source}: context_window = {cfg.context_window} must be at least 16{limit}")
    if not 0 <= cfg.lone_share <= 1:
        raise ConfigError(f"{source}: lone_share = {cfg.lone_share} must be between 0 and 1")
    if cfg.lone_share < 1 and cfg.context != "document":
        raise ConfigError(f"{source}: lone_share = {cfg.lone_share} needs context = document (sentences are all alone)")
    if not 0 < cfg.lr < math.inf:
        raise ConfigError(f"{source}: lr = {cfg.lr} must be positive and finite")
    if not 0 <= cfg.seed < 2**32:  # numpy's seeds
        raise ConfigError(f"{source}: seed = {cfg.seed} must be between 0 and 2**32 - 1")
    if cfg.report_to is not None:
        from accelerate.utils import LoggerType

        trackers = sorted(t.value for t in LoggerType)
        if cfg.report_to.lower() not in trackers:
            raise ConfigError(f"{source}: report_to = {cfg.report_to!r} must be one of {', '.join(trackers)}")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ConfigError(f"{source}: warmup_ratio = {cfg.warmup_ratio} must be between 0 and 1")


def _matches(value, hint) -> bool:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option in (str, bool) and type(value) is option:
            return True
    return False


def _describe(hint) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("none" if o is type(None) else o.__name__ for o in options)
