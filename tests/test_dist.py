"""`nerbatch.dist`: the launcher, accelerate and the process group agree; GPUs shared only when needed."""

from __future__ import annotations

import sys

import pytest

from nerbatch.dist import (
    LaunchError,
    barrier,
    check_world,
    cpu_threads,
    describe,
    launch_command,
    process_state,
    shares_gpus,
)
from nerbatch.errors import NerbatchError


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


LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    "env, gpus, threads",
    [
        ({}, 0, None),  # run plainly: torch's own choice (OMP_NUM_THREADS honoured)
        ({"OMP_NUM_THREADS": "1"}, 0, None),  # set by the user, not a launcher
        (LAUNCHED, 0, 8),  # accelerate's default 1 on a CPU: every core
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "4"}, 0, 2),  # shared among the node's processes
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "16"}, 0, 1),
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}, 0, 4),  # torchrun, no OMP_NUM_THREADS yet
        ({**LAUNCHED, "OMP_NUM_THREADS": "3"}, 0, None),  # the user's value, passed through
        (LAUNCHED, 1, None),  # on a GPU one thread is right
        ({"NERBATCH_CPU_THREADS": "5"}, 1, 5),  # asked for, anywhere
    ],
)
def test_launched_cpu_processes_share_the_cores(monkeypatch, env, gpus, threads):
    import os

    import torch

    for name in ["ACCELERATE_MIXED_PRECISION", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NERBATCH_CPU_THREADS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cpu_threads() == threads


def test_a_bad_thread_count_is_refused(monkeypatch):
    monkeypatch.setenv("NERBATCH_CPU_THREADS", "all")
    with pytest.raises(NerbatchError, match="NERBATCH_CPU_THREADS='all'"):
        cpu_threads()


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
