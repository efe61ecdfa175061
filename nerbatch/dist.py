"""The one place that knows how the processes were launched; everything else takes an Accelerator
or plain ints."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from nerbatch.errors import NerbatchError


class LaunchError(NerbatchError):
    """The launcher and accelerate disagree on the number of processes."""


def use_cpu() -> bool:
    """Run on the CPU when CUDA is absent.

    Several CPU processes are started by torchrun (`accelerate launch --multi_gpu --num_processes N`;
    accelerate's `--cpu` launcher starts only one without MPI). Without `cpu=True`, accelerate finds
    no GPU and makes each of them a lone non-distributed process: N copies of rank 0.
    """
    return not torch.cuda.is_available()


THREADS_ENV = "NERBATCH_CPU_THREADS"


def cpu_threads() -> int | None:
    """Torch threads for this process on a CPU-only machine, or None to leave torch's choice.

    Launchers set `OMP_NUM_THREADS=1` for their processes unless it is set already: accelerate's
    for any process count without `--cpu`, torchrun for several. On a GPU that is right; on a CPU it
    leaves all but one core idle (a single-process training run on 2 cores used 85% of one core).
    So under a launcher, a 1 counts as the launcher's default and each process gets its share of
    the cores it may run on. Any other value, and `NERBATCH_CPU_THREADS`, are the user's choice.
    """
    if THREADS_ENV in os.environ:
        value = os.environ[THREADS_ENV]
        if not value.isdigit() or int(value) < 1:
            raise NerbatchError(f"{THREADS_ENV}={value!r}: expected a whole number of threads, at least 1")
        return int(value)
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if not use_cpu() or not launched or os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local)


def share_cpu_cores() -> None:
    """Apply `cpu_threads` to torch (intra-op threads; nothing to do where it returns None)."""
    threads = cpu_threads()
    if threads is not None:
        torch.set_num_threads(threads)


def check_world(processes: int) -> None:
    """Refuse to run when the launcher started more processes than accelerate joined into one group."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes:
        raise LaunchError(
            f"the launcher started {launched} processes but accelerate sees {processes}; check the launch command"
        )


def make_accelerator(**kwargs):
    """An `Accelerator` joined into the launcher's process group (see `use_cpu`)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=use_cpu(), **kwargs)
    check_world(accelerator.num_processes)
    share_cpu_cores()
    stop_with_launcher()
    return accelerator


def shares_gpus() -> bool:
    """Whether this machine runs more of the job's processes than it has GPUs, so that some share one
    (process k runs on GPU k mod GPUs)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.cuda.is_available() and local > torch.cuda.device_count()


def process_state(backend: str | None = None):
    """accelerate's `PartialState` (rank, world size, device) for jobs that train nothing.

    `backend` names the process group's backend when the launcher started a group (else accelerate
    chooses: NCCL on GPUs, gloo on CPUs); see `shares_gpus`.
    """
    from accelerate import PartialState

    # accelerate forms a group only under a launcher (LOCAL_RANK set); a backend without one fails
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    state = PartialState(cpu=use_cpu(), backend=backend if launched else None)
    check_world(state.num_processes)
    share_cpu_cores()
    stop_with_launcher()
    return state


LAUNCHER_POLL_SECONDS = 1.0
_watching = False


def stop_with_launcher() -> threading.Thread | None:
    """Under torchrun (what `accelerate launch --multi_gpu` runs), end this process once the
    launcher, its parent, is gone. torchrun starts each rank in a session of its own, so killing the
    launcher's process group does not reach the ranks: they would go on writing beside the rerun
    (a chaos run saw a rerun's units fail on the old ranks' temporary files). Ending abruptly is what
    preemption does; the rerun redoes the unfinished units (annotate) or resumes (train)."""
    global _watching
    if "TORCHELASTIC_RUN_ID" not in os.environ or _watching:
        return None
    _watching = True
    parent = os.getppid()

    def launcher_gone() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_SECONDS)

    return exit_after(launcher_gone, f"nerbatch: the launcher (pid {parent}) is gone; this rank stops")


def exit_after(wait_for_death: Callable[[], None], message: str) -> threading.Thread:
    """Start a daemon thread that calls `wait_for_death` (it returns when the process this one
    depends on is gone), prints `message` and ends this process at once, whatever the main thread
    is blocked in (a read, a collective): no clean-up, as preemption would end it."""

    def watch() -> None:
        wait_for_death()
        try:  # stderr may be a pipe whose reader died with that process (`| tee log`)
            print(message, file=sys.stderr, flush=True)
        finally:
            os._exit(1)

    thread = threading.Thread(target=watch, name="nerbatch-watch", daemon=True)
    thread.start()
    return thread


def barrier(state) -> None:
    """Wait until every process of `state`'s group is here (alone: return at once).

    With a gloo group on GPUs (processes sharing them) the barrier names no device: accelerate's
    `wait_for_everyone` names `cuda:{local rank}`, which does not exist there.
    """
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group and torch.distributed.get_backend() == "gloo":
        torch.distributed.barrier()
    else:
        state.wait_for_everyone()


def gather_objects(value) -> list:
    """Every process's `value` (picklable), in rank order, to every process (alone: `[value]`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def shut_down() -> None:
    """Leave the process group, if there is one, before the interpreter exits (accelerate's
    `end_training` does it for training). A gloo group left to the interpreter's exit can abort the
    process ("terminate called without an active exception", SIGABRT: seen once in a 3-process
    `evaluate` in CI) after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def describe(processes: int) -> str:
    """'1 process' / 'N processes', for log lines the tests read."""
    return f"{processes} process{'es' if processes > 1 else ''}"


def on_device(device: torch.device) -> str:
    """'cuda' / 'cpu, 4 threads': where a process computes, for log lines."""
    if device.type != "cpu":
        return device.type
    threads = torch.get_num_threads()
    return f"cpu, {threads} thread{'s' if threads > 1 else ''}"


def launch_command(processes: int, port: int | None = None) -> list[str]:
    """The `accelerate launch` command line (up to the script) that starts `processes` real processes
    on this machine: `--multi_gpu` goes through torchrun on CPU too (see `use_cpu`)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    return command + (["--main_process_port", str(port)] if port else [])
