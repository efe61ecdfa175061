"""What `--precision auto` runs, and why: the CPU's kind, the model's precision check, the run's record.

On a GPU, auto is fp16 autocast. On a CPU it is the row of `nerbatch.cpu.CPU_KINDS` this CPU falls
in: bf16 where the CPU computes in bf16, else fp32, for any model; int8 instead where int8 measured
faster, but only for a model that carries a passing int8 check. The check (`check_model`, run by
`nerbatch check-precision` and at the end of `nerbatch train`) scores the model on labelled
validation data at fp32 and at the reduced precision, at sentence and document level, and writes
`PRECISION_RECORD` beside the weights with the model's fingerprint: it holds only for those weights.

A rerun into an OUT_DIR keeps the precision its run was written at (`previous`): reused where this
CPU runs it, refused otherwise, so one output never mixes two precisions.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nerbatch import __version__
from nerbatch.cpu import cpu_flags, cpu_kind, cpu_model, has_native_bf16
from nerbatch.errors import OptionError

PRECISION_RECORD = "nerbatch_precision.json"  # beside config.json; not part of the model's fingerprint
TOLERANCE = 0.003  # the most F1 (sentence or document level) a lossy precision may lose to run by default
# The int8 scheme `nerbatch.precision` runs (named as benchmarks/int8_variants.py names it): per-channel
# weights, full-range dynamic activations, 8 outlier input channels of the first down-projection in
# fp32. A check of another scheme does not count. Here, not there: reading a record needs no torch.
INT8_SCHEME = "pc-split8-full"


@dataclass(frozen=True)
class Choice:
    """A resolved precision, the one-line reason for it, and what runs it (recorded in the output)."""

    precision: str  # fp32, bf16, fp16 or int8
    reason: str
    kernel: str  # the unit and library that run it: spans may differ between int8 kernels
    cpu: str  # the CPU kind (`nerbatch.cpu`), or "cuda"
    requested: str = "auto"

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for the log: the precision, what runs it and why."""
        return f"precision {self.precision} ({self.kernel}): {self.reason}"


def choose_precision(
    requested: str,
    device_type: str = "cpu",
    model: str | None = None,
    flags: frozenset[str] | None = None,
    previous: str | None = None,
    evidence: dict | None = None,
) -> Choice:
    """The precision to run for `requested` on `device_type`.

    `flags`: the CPU flags every worker of the run has (default this CPU's); `model`: a local model
    directory whose precision record may allow int8 (or pass its `evidence`, read elsewhere);
    `previous`: the precision OUT_DIR's run was written at, if any.
    """
    if device_type == "cuda":
        return _gpu_choice(requested)
    kind = cpu_kind(flags)
    if requested != "auto":
        return _explicit_cpu_choice(requested, kind, flags)
    if previous is not None:
        return _resumed_choice(previous, kind, flags)
    if evidence is None and model is not None:
        evidence = read_record(model)
    lossy = passing_check(evidence, "int8")
    if kind.int8 and lossy:
        return Choice("int8", f"{lossy}; int8 is the fastest this CPU ({kind.name}) runs", kind.int8_kernel, kind.name)
    if kind.lossless == "bf16":
        why = f"this CPU ({kind.name}) computes in bf16, at F1 within {TOLERANCE} of fp32"
        return Choice("bf16", why, kind.bf16_kernel, kind.name)
    why = f"this CPU ({kind.name}) has no bf16 unit"
    if kind.int8:
        why += f"; int8 would be faster but {_no_check_reason(evidence, 'int8')}"
    return Choice("fp32", why, "ATen/oneDNN fp32", kind.name)


def _gpu_choice(requested: str) -> Choice:
    if requested == "int8":
        raise OptionError("--precision int8 is for CPUs (fbgemm kernels); on a GPU use bf16 or fp16 (or auto)")
    precision = "fp16" if requested == "auto" else requested
    why = "asked for"
    if requested == "auto":
        why = "auto on a GPU: fp16 autocast, a batch that overflows runs again in fp32"
    return Choice(precision, why, "CUDA", "cuda", requested)


def _explicit_cpu_choice(requested: str, kind, flags) -> Choice:
    if requested == "fp16":
        raise OptionError("--precision fp16 needs a GPU; on a CPU use fp32, bf16 or int8")
    if requested == "bf16" and not has_native_bf16(flags):
        print(
            f"nerbatch: warning: --precision bf16 on a CPU without bf16 units ({kind.name}): bf16 is emulated "
            "here, slower than fp32",
            file=sys.stderr,
        )
        return Choice("bf16", "asked for (emulated on this CPU)", "ATen emulated bf16", kind.name, requested)
    kernel = {"int8": kind.int8_kernel, "bf16": kind.bf16_kernel}.get(requested, "ATen/oneDNN fp32")
    return Choice(requested, "asked for", kernel, kind.name, requested)


def _resumed_choice(previous: str, kind, flags) -> Choice:
    """A rerun keeps the precision its OUT_DIR was written at, where this CPU runs it."""
    if previous == "bf16" and not has_native_bf16(flags):
        raise OptionError(
            f"OUT_DIR's run was written at bf16, which this CPU ({kind.name}) has no unit for, so --precision auto "
            "would run another precision and mix two in one output: pass --precision bf16 to finish it here "
            "(emulated, slower), or another --precision with --overwrite to start over"
        )
    if previous == "fp16":
        raise OptionError(
            "OUT_DIR's run was written at fp16 on a GPU: finish it on a GPU, or pass --precision with --overwrite"
        )
    kernel = {"int8": kind.int8_kernel, "bf16": kind.bf16_kernel}.get(previous, "ATen/oneDNN fp32")
    why = f"the run in OUT_DIR was written at {previous}: a rerun keeps its precision"
    return Choice(previous, why, kernel, kind.name)


def warn_of_another_kernel(previous: dict | None, choice: Choice) -> None:
    """Warn when a rerun into an OUT_DIR runs its precision on another kernel than the pieces already
    written (`previous`: their recorded choice): int8 or bf16 spans on a near tie may differ between
    kernels, so the output would hold both."""
    if not previous or previous.get("precision") != choice.precision or choice.precision == "fp32":
        return
    if previous.get("kernel") and previous["kernel"] != choice.kernel:
        print(
            f"nerbatch: warning: OUT_DIR's earlier pieces ran {choice.precision} on {previous['kernel']} "
            f"({previous.get('cpu', 'another CPU')}), these run on {choice.kernel} ({choice.cpu}): a span on a near "
            f"tie may come out differently on the two. Pass --overwrite to write the whole output on one kernel",
            file=sys.stderr,
        )


def local_model(name: str) -> str | None:
    """The directory of model `name` (which may hold a precision record), or None for a hub id."""
    from nerbatch.modeling import resolve_model

    path = resolve_model(name)
    return path if Path(path).is_dir() else None


def agreed_flags(flag_sets: list) -> frozenset[str]:
    """The CPU flags every worker has: one precision for a run whose workers are on different CPUs."""
    sets = [frozenset(flags) for flags in flag_sets]
    return frozenset.intersection(*sets) if sets else cpu_flags()


# ----- the precision record: a model's F1 at each precision -----


def read_record(model: str) -> dict | None:
    """The precision record of local model directory `model` if it was written for these weights
    (same fingerprint), else None (hub ids have none)."""
    from nerbatch.runconfig import model_fingerprint

    path = Path(model) / PRECISION_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("model_fingerprint") == model_fingerprint(model) else None


def passing_check(record: dict | None, precision: str) -> str | None:
    """Why `record` allows `precision` by default (one line), or None when it does not."""
    check = (record or {}).get("checks", {}).get(precision)
    if not check or not check.get("passed") or (precision == "int8" and check.get("scheme") != INT8_SCHEME):
        return None
    return f"the model's {precision} check passed (F1 {check['loss']:+.4f} against fp32 on {check['data']})"


def _no_check_reason(record: dict | None, precision: str) -> str:
    check = (record or {}).get("checks", {}).get(precision)
    if not check:
        return f"the model has no {precision} check (nerbatch check-precision MODEL VALIDATION)"
    if not check.get("passed"):
        return f"the model's {precision} check lost {-check['loss']:.4f} F1 (more than {TOLERANCE})"
    return f"the model's {precision} check is of another int8 scheme ({check.get('scheme')})"


def check_model(
    model: str,
    data: str,
    precisions: list[str],
    split: str = "validation",
    document_column: str | None = None,
    batch_size: int = 32,
    tokens_column: str = "tokens",
    tags_column: str = "ner_tags",
) -> dict:
    """Score `model` on `data` at fp32 and at each of `precisions`, at sentence level and (where the
    data has documents) document level, on CPU; write the result into the model directory's
    `PRECISION_RECORD` and return it. A precision passes when no level loses more than `TOLERANCE`."""
    from nerbatch.data import load_corpus
    from nerbatch.evaluation import evaluate_dir
    from nerbatch.runconfig import model_fingerprint

    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise OptionError(f"{model}: check-precision needs a local model directory (it writes its record there)")
    has_documents = load_corpus(data, split, tokens_column, tags_column, document_column).has_documents
    levels = ["sentence", "document"] if has_documents else ["sentence"]
    scores: dict[str, dict[str, float]] = {}
    for precision in ["fp32", *precisions]:
        scores[precision] = {}
        for level in levels:
            metrics = evaluate_dir(
                model,
                data,
                split,
                batch_size,
                tokens_column=tokens_column,
                tags_column=tags_column,
                documents=level == "document",
                document_column=document_column,
                annotate_options={"precision": precision},
            )
            scores[precision][level] = round(metrics["overall_f1"], 6)
    record = read_record(model) or {}
    record.setdefault("checks", {})
    record |= {"model_fingerprint": model_fingerprint(model), "nerbatch": __version__}
    for precision in precisions:
        loss = min(scores[precision][level] - scores["fp32"][level] for level in levels)
        record["checks"][precision] = _check_entry(precision, data, levels, scores, loss)
    (directory / PRECISION_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _check_entry(precision: str, data: str, levels: list[str], scores: dict, loss: float) -> dict:
    kind = cpu_kind()
    return {
        "passed": loss >= -TOLERANCE,
        "loss": round(loss, 6),
        "tolerance": TOLERANCE,
        "levels": levels,
        "f1": {level: {"fp32": scores["fp32"][level], precision: scores[precision][level]} for level in levels},
        "data": data,
        **({"scheme": INT8_SCHEME} if precision == "int8" else {}),
        "kernel": {"int8": kind.int8_kernel, "bf16": kind.bf16_kernel}.get(precision),
        "cpu": f"{cpu_model()} ({kind.name}, {platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
    }


def checkable(flags: frozenset[str] | None = None) -> list[str]:
    """The reduced precisions this CPU can check: int8 always, bf16 where it is native."""
    return ["int8", "bf16"] if has_native_bf16(flags) else ["int8"]
