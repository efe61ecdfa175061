"""`nerbatch.dist`: the launcher, accelerate and the process group agree; GPUs shared only when needed."""

from __future__ import annotations

import sys

import pytest

from nerbatch.dist import LaunchError, barrier, check_world, describe, launch_command, process_state, shares_gpus


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
