"""The GPU benchmark's runner: steps in processes of their own under one time budget, one report.

A benchmark (`Benchmark`) names its steps, its sizes (a dataclass: the device's and the dry run's),
its targets and how to print its summary; this module runs it. The driver (`drive`) runs each step
as `python -m MODULE --step NAME` in its own process group, kills it at its deadline, and rewrites
the report after every step; inside a step (`run_step`) a `Context` carries the sizes, the folders,
the deadline and the results the step records as it goes, so a step that fails or runs out of time
keeps what it measured. One process per step, because a CUDA error leaves the process that met it
unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Benchmark:
    """What the runner runs: steps in order (name: (function of a Context, seconds at most)), sizes,
    targets ((name, path in the report, at least)), and the report's keys in order."""

    module: str  # run as `python -m MODULE --step NAME` for each step
    description: str
    steps: dict[str, tuple[Callable, float]]
    sizes: object  # a frozen dataclass: the device run's sizes
    dry_sizes: object  # the same at tiny sizes, for a dry run on the CPU
    targets: tuple
    report_order: tuple[str, ...]
    machine_info: Callable[[], dict]
    print_summary: Callable[[dict], None]
    carry: Path
    report_name: str = "gpu.json"


# Every process the benchmark starts: offline, quiet, this checkout importable (never pip-installed
# on the device: the package's pins differ from what is installed there).
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

RESERVE_S = 10  # kept back from the budget to write the report

MIN_STEP_S = 20  # a step that would get less time than this is skipped

GRACE_S = 10  # a step past its deadline gets this long to finish before it is killed


class CommandFailed(RuntimeError):
    """A subprocess exited non-zero or ran out of time; the message ends with its log's last lines."""


@dataclass
class Context:
    """What a step needs (sizes, folders, its deadline) and the results it records as it goes."""

    name: str
    sizes: object  # the benchmark's sizes dataclass
    dry_run: bool
    out: Path
    workdir: Path
    carry: Path
    deadline: float  # time.time() by which the step must be done
    started: float  # time.time() when the whole run started (for the log lines)
    result: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return max(self.deadline - time.time(), 1.0)

    def say(self, message: str) -> None:
        print(f"[{time.time() - self.started:6.1f} s] {self.name}: {message}", flush=True)

    def save(self) -> None:
        write_json(step_file(self.workdir, self.name), self.result)

    def assets(self) -> dict:
        return json.loads(step_file(self.workdir, "assets").read_text())

    @cached_property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def attempt(self, label: str, fn, *args) -> dict:
        """Run one measurement; a failure becomes {"error": ...} so the step's other measurements survive."""
        began = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as exc:
            traceback.print_exc()
            result = {"error": describe_error(exc)}
        status = f"FAILED: {result['error'][:300]}" if "error" in result else "done"
        self.say(f"{label}: {status} ({time.perf_counter() - began:.1f} s)")
        return result


def write_json(path: Path, data: dict) -> None:
    """Write `data` atomically (a reader never sees half a file, even if this process is killed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    os.replace(temporary, path)


def step_file(workdir: Path, name: str) -> Path:
    return workdir / "steps" / f"{name}.json"


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def child_env(**extra: str) -> dict:
    """The environment of a subprocess: ours, offline and quiet, this checkout first on the path.
    Mixed precision only where asked: the reference loop must run in fp32."""
    env = {**os.environ, **ENVIRONMENT}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    paths = env.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, paths)])
    return {**env, **extra}


def log_tail(log: Path, lines: int = 12) -> str:
    """The last non-blank lines of a log (progress bars' carriage returns count as line ends), joined."""
    text = log.read_text(errors="replace") if log.exists() else ""
    kept = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-1500:] or "(no output)"


def run_logged(cmd: list[str], log: Path, timeout: float, **env: str) -> float:
    """Run `cmd` from the repository with its output in `log`; return its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join(cmd[1:4])
    began = time.perf_counter()
    with open(log, "w") as f:
        try:
            done = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(**env), cwd=REPO, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(f"{shown}: stopped after {timeout:.0f} s (time budget); {log_tail(log)}") from exc
    if done.returncode:
        raise CommandFailed(f"{shown} exited with {done.returncode}: {log_tail(log)}")
    return time.perf_counter() - began


def dig(report: dict, path: tuple[str, ...]):
    """report[path[0]][path[1]]..., or None where a key is missing."""
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def nested_errors(result: dict, prefix: str = "") -> list[str]:
    """'where: message' for every `error` inside `result`."""
    found = []
    for key, value in result.items():
        if key == "error":
            found.append(f"{prefix or 'step'}: {value}")
        elif isinstance(value, dict):
            found += nested_errors(value, f"{prefix}/{key}" if prefix else key)
    return found


def run_step_process(bench: Benchmark, name: str, args, workdir: Path, started: float, budget: float) -> dict:
    """Run one step in its own process group until it ends or its deadline passes; return what it
    recorded, with an `error` when it failed, was stopped or was skipped."""
    _, cap = bench.steps[name]
    left = started + budget - RESERVE_S - time.time()
    if left < MIN_STEP_S:
        return {"error": f"skipped: {max(left, 0):.0f} s left of the {budget:.0f} s budget"}
    allowed = min(cap, left)
    cmd = [
        sys.executable,
        "-u",
        "-m",
        bench.module,
        "--step",
        name,
        "--out",
        str(args.out),
        "--workdir",
        str(workdir),
    ]
    cmd += ["--carry", str(args.carry), "--deadline", str(time.time() + allowed), "--started", str(started)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += [arg for setting in args.set for arg in ("--set", setting)]
    began = time.time()
    process = subprocess.Popen(cmd, env=child_env(), start_new_session=True)
    try:
        code = process.wait(allowed + GRACE_S)
        stopped = None
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the step and whatever it started
        process.wait()
        code, stopped = -signal.SIGKILL, f"stopped after {allowed:.0f} s (its share of the time budget)"
    path = step_file(workdir, name)
    result = json.loads(path.read_text()) if path.exists() else {}
    if stopped or (code and "error" not in result):
        result["error"] = stopped or f"the step's process exited with {code} (traceback above in run.log)"
    return {**result, "seconds": time.time() - began}


def check_targets(bench: Benchmark, report: dict) -> dict:
    """Each target's value, threshold and whether it was met (False when not measured)."""
    checked = {}
    for name, path, least in bench.targets:
        value = dig(report, path)
        checked[name] = {"value": value, "at_least": least, "met": value is not None and value >= least}
    return checked


def write_report(bench: Benchmark, out: Path, report: dict) -> None:
    write_json(out / bench.report_name, {key: report[key] for key in bench.report_order if key in report})


def chosen_sizes(bench: Benchmark, args):
    """The GPU or dry-run sizes with the `--set FIELD=JSON` overrides applied."""
    sizes = bench.dry_sizes if args.dry_run else bench.sizes
    overrides = {}
    for setting in args.set:
        name, _, value = setting.partition("=")
        if name not in type(sizes).__dataclass_fields__:
            raise SystemExit(f"--set {setting}: no size called {name!r}")
        try:
            value = json.loads(value)
        except ValueError:
            raise SystemExit(
                f"--set {setting}: the value is not JSON (strings need quotes: {name}='\"...\"')"
            ) from None
        default = getattr(sizes, name)
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
            raise SystemExit(f"--set {setting}: {name} takes a {type(default).__name__}")
        overrides[name] = value
    unknown = set(overrides.get("steps", ())) - set(bench.steps)
    if unknown:
        raise SystemExit(f"--set steps: no step called {', '.join(sorted(unknown))} (steps: {', '.join(bench.steps)})")
    return replace(sizes, **overrides)


def drive(bench: Benchmark, args) -> int:
    """Run every step in order under the time budget, rewriting the report after each."""
    sizes = chosen_sizes(bench, args)
    budget = args.budget or sizes.budget_s
    started = time.time()
    report = {"dry_run": args.dry_run, "budget_s": budget, "elapsed_s": 0.0, "sizes": asdict(sizes)}
    try:
        report["machine"] = bench.machine_info()
    except Exception as exc:  # recorded; without torch the steps will say the rest
        traceback.print_exc()
        report["machine"] = {"error": describe_error(exc), "gpu": None}
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nerbatch-gpu-") as scratch:
        for name in bench.steps:
            if sizes.steps and name != "assets" and name not in sizes.steps:
                continue
            if not args.dry_run and report["machine"]["gpu"] is None:
                report[name] = {"error": "torch finds no CUDA device (on a CPU, run with --dry-run)"}
            elif name != "assets" and "error" in report["assets"]:
                report[name] = {"error": "not run: the assets step failed"}
            else:
                print(f"[{time.time() - started:6.1f} s] --- {name}", flush=True)
                report[name] = run_step_process(bench, name, args, Path(scratch), started, budget)
            report["elapsed_s"] = time.time() - started
            write_report(bench, args.out, report)
    report["targets"] = check_targets(bench, report)
    report["elapsed_s"] = time.time() - started
    write_report(bench, args.out, report)
    bench.print_summary(report)
    return 1 if any(nested_errors(report.get(name, {})) for name in bench.steps) else 0


def run_step(bench: Benchmark, args) -> int:
    """Inside a step's process: run it, record its result (and any error), exit non-zero on error."""
    sizes = chosen_sizes(bench, args)
    ctx = Context(args.step, sizes, args.dry_run, args.out, args.workdir, args.carry, args.deadline, args.started)
    step, _ = bench.steps[args.step]
    try:
        step(ctx)
    except Exception as exc:
        traceback.print_exc()
        ctx.result["error"] = describe_error(exc)
    errors = nested_errors(ctx.result)
    if errors and "error" not in ctx.result:
        ctx.result["error"] = f"{len(errors)} measurement(s) failed: " + "; ".join(errors)[:2000]
    ctx.save()
    return 1 if errors else 0


def parse_args(bench: Benchmark, argv: list[str] | None):
    parser = argparse.ArgumentParser(description=bench.description)
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu.json, run logs and tests.xml.")
    parser.add_argument("--dry-run", action="store_true", help="Every step at tiny sizes on the CPU (CUDA hidden).")
    parser.add_argument("--budget", type=float, help="Seconds for the whole run [GPU 480, dry run 240].")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="Override one of the sizes, e.g. --set 'steps=[\"annotation\"]' (a shorter rerun).",
    )
    parser.add_argument("--carry", type=Path, default=bench.carry, help=f"The folder prepare.py made [{bench.carry}].")
    # internal: the driver runs each step as `--step NAME` in a process of its own
    parser.add_argument("--step", choices=list(bench.steps), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.carry = args.carry.resolve()
    return args


def main(bench: Benchmark, argv: list[str] | None = None) -> int:
    """The command line: drive every step, or (internal) run one step in this process."""
    args = parse_args(bench, argv)
    if args.dry_run:  # before torch is imported; the steps inherit both
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["OMP_NUM_THREADS"] = "1"  # 2-thread processes on a busy 2-core machine slow down 10-100x
    os.environ.update(ENVIRONMENT)
    args.out.mkdir(parents=True, exist_ok=True)
    return run_step(bench, args) if args.step else drive(bench, args)
