"""Proof, before any work, that every process of a run writes into the OUT_DIR the others see and
runs the same nerbatch and torch; both engines use it.

The main process (Ray's driver, or rank 0) leaves a token in OUT_DIR; every worker (an actor, or
another rank) must read it and leave its own, which the main process must read back. A directory
local to each node (the same path on every node's own disk) fails one side or the other: its files
would be scattered over the nodes, and the run's output files would each miss some units.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from importlib import metadata

from nerbatch import __version__
from nerbatch.job import Plan
from nerbatch.parquet_io import InputError
from nerbatch.rundir import RunDir

MAIN = "main"  # the name the main process's token goes under
PRIVATE_OUT_ENV = "NERBATCH_TEST_PRIVATE_OUT"  # test hook: see `node_view`


def node_facts() -> dict:
    """What a process says of itself: its host and the versions that must agree across nodes (read
    from the installed distributions: a driver need not import torch)."""
    return {"host": socket.gethostname(), "nerbatch": __version__, "torch": metadata.version("torch")}


def leave_token(out: RunDir, token: str, who: str) -> dict:
    """Write this process's facts under `token` as `who`; returns them."""
    facts = node_facts()
    out.write_probe(token, who, facts)
    return facts


def answer(out: RunDir, token: str, who: str) -> dict:
    """A worker's side: whether it sees the main process's token (`saw_main`), and its own facts,
    left for the main process to read back."""
    main = out.read_probe(token, MAIN)
    return {**leave_token(out, token, who), "saw_main": main is not None, "main_host": (main or {}).get("host")}


def check_workers(
    out: RunDir, token: str, answers: dict[str, dict], main_label: str, tokens: dict[str, str] | None = None
) -> None:
    """The main process's side: every worker (name -> its `answer`; its token's name in `tokens`,
    else its name) saw the main token, left one the main process sees, and runs the main process's
    versions; else a one-line `InputError`."""
    ours = node_facts()
    for who, facts in answers.items():
        label = f"{who} on {facts['host']}"
        if not facts["saw_main"] or out.read_probe(token, (tokens or {}).get(who, who)) is None:
            raise not_shared(out, f"{main_label} ({ours['host']})", label)
        check_versions(ours, facts, main_label, label)


def check_versions(ours: dict, theirs: dict, main_label: str, label: str) -> None:
    """The same nerbatch and torch; torch's build (`+cpu`, `+cu130`) may differ: a CPU-only driver
    or head node drives GPU workers."""
    mine, other = ({"nerbatch": f["nerbatch"], "torch": f["torch"].split("+")[0]} for f in (ours, theirs))
    if mine != other:
        raise InputError(f"{label} runs {other}, {main_label} {mine}: install the same versions on every node")


def not_shared(out: RunDir, main: str, worker: str) -> InputError:
    return InputError(
        f"{out.root} is not shared between {main} and {worker}: a local directory on each node would "
        "scatter the output; use a shared filesystem or an object store URI (s3://, gs://, ...) for --output"
    )


def node_view(plan: Plan) -> Plan:
    """The plan as this node sees it. The test hook `PRIVATE_OUT_ENV` (a directory) gives this node
    its own copy of a local OUT_DIR, as a directory on a node's local disk is: writes land there,
    invisible to the main process (the probe must refuse it)."""
    private = os.environ.get(PRIVATE_OUT_ENV)
    if not private or not plan.out.root.local:
        return plan
    return replace(plan, out=RunDir(os.path.join(private, plan.out.root.path.lstrip("/"))))
