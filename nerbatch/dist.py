"""The one place that knows how the processes were launched; everything else takes an Accelerator
or plain ints."""

from __future__ import annotations

import os
import sys

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
    return accelerator


def process_state(backend: str | None = None):
    """accelerate's `PartialState` (rank, world size, device) for jobs that train nothing.

    `backend="gloo"` keeps the group's collectives on the CPU, so that several processes may share
    one GPU (NCCL refuses two ranks on one device); each process still runs its model on
    `cuda:{local rank % GPUs}`.
    """
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a lone process has no group to give a backend
    state = PartialState(cpu=use_cpu(), backend=backend if launched else None)
    check_world(state.num_processes)
    return state


def barrier() -> None:
    """Wait until every process of the group is here (alone: return at once).

    accelerate's `wait_for_everyone` names the device `cuda:{local rank}`, which does not exist
    when several processes share a GPU; a gloo barrier needs no device.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def describe(processes: int) -> str:
    """'1 process' / 'N processes', for log lines the tests read."""
    return f"{processes} process{'es' if processes > 1 else ''}"


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
