"""The annotate job on a Ray cluster: one driver hands units out on demand to a pool of actors.

The driver plans the run from the options alone (no model: the head node may have no GPU), starts
the actors, and asks each to load the model where it will run; the device-dependent settings
(precision, batch caps) are resolved there and must agree across actors. Before any unit, every
actor proves it sees what the driver sees: it reads a token the driver wrote into OUT_DIR and
writes one the driver must read back, and its nerbatch and torch versions must be the driver's.
Then units go to whichever actor is free. An actor that dies (killed, out of memory, its node
preempted) is restarted by Ray and its unit handed out again, up to `max_attempts` times; a unit
that raises is recorded failed at once (the error is in the data). When every unit has settled,
the output files are assembled by Ray tasks and the driver writes the totals.

Exactly once: each attempt writes its piece under a temporary name of its own and publishes it in
one move; the done marker follows and is written once. A stale attempt (an actor the driver gave
up on that still runs) can at most publish the same rows of the same unit again. Actors are not
detached, so they end with the driver; a local cluster the driver started ends with it too.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass

from nerbatch.autoprecision import Choice, agreed_flags
from nerbatch.cpu import cpu_flags
from nerbatch.engines import probe
from nerbatch.errors import NerbatchError, OptionError
from nerbatch.job import (
    Plan,
    Progress,
    UnitsFailed,
    assemble_if_ready,
    choose_run_precision,
    finish_run,
    plan_run,
    record_failure,
    say_choice,
)
from nerbatch.options import Options
from nerbatch.parquet_io import InputError
from nerbatch.rundir import Tally, peak_rss_mb
from nerbatch.shards import warn_about_units

GPU_SHARE = 0.25  # actors per GPU on a GPU cluster: 4 processes sharing one GPU was the measured knee
CPUS_PER_GPU_ACTOR = 4  # cores for each actor's CPU side (tokenizing, decoding, writing) on a GPU cluster
LOCAL_OBJECT_STORE = 256 * 2**20  # a local cluster's object store: only unit descriptions and counts travel
WAIT_S = 10.0  # the driver renews its claim on OUT_DIR at least this often
RESTING_S = 0.5  # how often to ask whether an actor that died is back
CONNECT_TIMEOUT_S = 5.0
# The driver's settings the actors take with them: the test hooks, and offline mode for the hub.
FORWARDED_ENV = ("NERBATCH_TEST_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class RayOptions:
    """Where and how the actors run (none of it is recorded in the run config: any engine resumes)."""

    address: str | None = None  # a cluster to join (or RAY_ADDRESS); None: start a local one
    actors: int | None = None  # None: as many as the cluster's CPUs or GPUs hold
    gpus_per_actor: float | None = None  # None: GPU_SHARE on a cluster with GPUs, else 0
    cpus_per_actor: float | None = None  # None: CPUS_PER_GPU_ACTOR with GPUs, else 1
    max_attempts: int = 3  # hand a unit out at most this many times when its actor dies


def annotate_with_ray(options: Options, settings: RayOptions) -> Tally:
    """Run the job `options` describes on Ray; returns the run's tally.

    Raises a one-line `NerbatchError` before any work when Ray is missing, the cluster cannot be
    reached or cannot hold the actors, the model or inputs are out of reach, or OUT_DIR is not
    shared; `UnitsFailed` at the end when some units failed (the others are complete).
    """
    ray = import_ray()
    refuse_under_launcher()
    plan = plan_run(options)  # inputs, units and OUT_DIR's reach: before any cluster starts
    warn_about_units(plan.units)
    connect(ray, settings.address)
    token = uuid.uuid4().hex
    try:
        sizes = actor_resources(ray, settings)
        count = settings.actors or default_actors(ray, sizes)
        check_room(ray, sizes, count)
        plan.out.claim_driver(token)  # before anything is written: a second driver stops here
        # no more actors than units to do; --overwrite redoes them all (OUT_DIR is cleared below)
        pending = len(plan.units) if options.overwrite else len(plan.todo())
        workers = start_actors(ray, plan, sizes, min(count, max(pending, 1)))
        choice = agree_on_precision(ray, workers, plan)
        config, schema = agree_on_config(ray, workers, plan, choice)  # the actors load (and check) the model
        say_choice(choice)
        plan.out.prepare(config, options.overwrite)
        plan.out.refresh_driver(token)  # --overwrite cleared the claim with the rest
        probe_nodes(ray, workers, plan, token)
        tally, failed = dispatch(ray, workers, plan, settings.max_attempts, token, choice)
        record_actor_stats(ray, workers, plan)
        for worker in workers:  # their CPUs go to the assembly
            ray.kill(worker)
        plan.out.drop_temporaries()  # what attempts whose actor died left half written
        assemble_files(ray, plan, schema)
        if failed:
            raise UnitsFailed(failed)
        finish_run(plan, config)
        return tally
    finally:
        plan.out.release_driver(token)
        ray.shutdown()


def import_ray():
    try:
        import ray
    except ImportError:
        raise OptionError(
            "--engine ray needs Ray: pip install 'nerbatch[ray]' (or ray) into this environment"
        ) from None
    return ray


def refuse_under_launcher() -> None:
    """One engine at a time: under accelerate launch / torchrun every rank would start a driver."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ:
        raise OptionError(
            "--engine ray is one driver process: run `nerbatch annotate ... --engine ray` plainly, not under "
            "accelerate launch or torchrun (Ray places the work on the cluster)"
        )


def connect(ray, address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one; an address that does not
    answer is a one-line error within seconds, not a hang."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if address is None:
        # "local": a cluster of its own even where another runs on this machine (ray start)
        ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE, **quiet)
        return
    if address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise OptionError(f"--ray-address {address}: no Ray cluster answers there ({exc})") from None
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError) as exc:
        raise OptionError(f"--ray-address {address}: cannot join the cluster ({' '.join(str(exc).split())})") from None


@dataclass(frozen=True)
class ActorSize:
    cpus: float
    gpus: float


def actor_resources(ray, settings: RayOptions) -> ActorSize:
    """Each actor's CPUs and GPUs; asking for GPUs the cluster does not have now is refused (actors
    that can never be placed would wait for ever)."""
    have = ray.cluster_resources()
    gpus = settings.gpus_per_actor
    if gpus is None:
        gpus = GPU_SHARE if have.get("GPU", 0) > 0 else 0.0
    if gpus > 0 and have.get("GPU", 0) == 0:
        raise OptionError(
            f"--gpus-per-actor {gpus:g}: the cluster has no GPU ({have.get('CPU', 0):g} CPUs, "
            f"{have.get('memory', 0) / 2**30:.0f} GiB memory on {len(ray.nodes())} node(s)); pass --gpus-per-actor 0 "
            "to run on its CPUs, or start at least one GPU node first (an autoscaled group: minReplicas >= 1)"
        )
    cpus = settings.cpus_per_actor
    if cpus is None:
        cpus = float(CPUS_PER_GPU_ACTOR) if gpus > 0 else 1.0
    return ActorSize(cpus, gpus)


def default_actors(ray, size: ActorSize) -> int:
    """As many actors as the cluster holds now: by its GPUs when actors take a GPU share, else its CPUs."""
    have = ray.cluster_resources()
    if size.gpus > 0:
        return max(1, int(have.get("GPU", 0) / size.gpus))
    return max(1, int(have.get("CPU", 1) / size.cpus))


def check_room(ray, size: ActorSize, count: int) -> None:
    """Refuse more actors than the cluster holds now (they would wait for ever; on an autoscaled
    cluster, start the nodes first or pass fewer --actors)."""
    have = ray.cluster_resources()
    short = [
        f"{count} x {per:g} {name} = {count * per:g} {name}, the cluster has {have.get(key, 0):g}"
        for name, key, per in (("CPUs", "CPU", size.cpus), ("GPUs", "GPU", size.gpus))
        if per > 0 and count * per > have.get(key, 0) + 1e-9
    ]
    if short:
        raise OptionError(
            f"--actors {count}: {'; '.join(short)}; pass fewer --actors or smaller --cpus-per-actor / --gpus-per-actor"
        )


def start_actors(ray, plan: Plan, size: ActorSize, count: int) -> list:
    """`count` actors, each restarted by Ray whenever it dies (its unit is handed out again; a
    restarted actor gets the plan again from Ray and loads the model again)."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    remote = ray.remote(UnitWorker).options(
        num_cpus=size.cpus,
        num_gpus=size.gpus,
        max_restarts=-1,
        max_task_retries=0,
        **({"runtime_env": {"env_vars": forwarded}} if forwarded else {}),
    )
    return [remote.remote(plan, index, size.cpus) for index in range(count)]


def agree_on_precision(ray, workers: list, plan: Plan) -> Choice:
    """One precision for the whole run, before any work: resolved from the CPU flags every actor's
    node has (actors on different CPU types get what each of them runs natively) and the model's
    precision record as an actor reads it (the driver's node may not hold the model)."""
    facts = gather(ray, [w.cpu_facts.remote() for w in workers])
    device = "cuda" if any(f["cuda"] for f in facts) else "cpu"
    flags = agreed_flags([f["flags"] for f in facts])
    return choose_run_precision(plan, device, flags, evidence=facts[0]["evidence"] or {})


def agree_on_config(ray, workers: list, plan: Plan, choice: Choice) -> tuple[dict, object]:
    """Every actor loads the model where it runs, at `choice`, and describes the run; all must agree
    (one set of batch caps for the whole run), and run the driver's versions."""
    described = gather(ray, [w.describe.remote(choice) for w in workers])
    ours = probe.node_facts()
    for facts in described:
        probe.check_versions(ours, facts, "the driver", f"actor on {facts['host']}")
    config, schema = described[0]["config"], described[0]["schema"]
    for facts in described[1:]:
        if facts["config"] != config:
            options = {k for k in config["options"] if facts["config"]["options"].get(k) != config["options"][k]}
            raise InputError(
                f"actors resolved the run differently ({', '.join(sorted(options)) or 'model'} differ between "
                f"{described[0]['host']} and {facts['host']}): pass --precision and the batch options explicitly"
            )
    return config, schema


def probe_nodes(ray, workers: list, plan: Plan, token: str) -> None:
    """Each actor must read the driver's token in OUT_DIR and the driver each actor's (`probe`)."""
    out = plan.out
    probe.leave_token(out, token, probe.MAIN)
    try:
        answers = gather(ray, [w.probe.remote(token) for w in workers])
        probe.check_workers(out, token, {f"actor-{i}": facts for i, facts in enumerate(answers)}, "the driver")
    finally:
        out.drop_probe(token)


def dispatch(ray, workers: list, plan: Plan, max_attempts: int, token: str, choice: Choice) -> tuple[Tally, list]:
    """Hand the units not done to whichever actor is free until every one has settled; a unit whose
    actor died goes out again, up to `max_attempts` times, then is recorded failed. An actor that
    died gets no more work until it answers again (Ray restarts it)."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    queue = deque(plan.todo())
    attempts: Counter = Counter()
    free = set(range(len(workers)))  # idle actors
    waking: dict[int, float] = {}  # actors that died: when to ask again whether they are back
    pings: dict = {}  # object ref -> actor index
    running: dict = {}  # object ref -> (unit, actor index)
    tally, failed = Tally(), []
    bar = Progress(sum(u.rows for u in queue), plan.options.progress)
    renewed = time.time()
    try:
        while queue or running:
            for index in [i for i, after in waking.items() if after <= time.time()]:
                del waking[index]
                pings[workers[index].ping.remote()] = index
            while queue and free:
                index, unit = free.pop(), queue.popleft()
                attempts[unit] += 1
                running[workers[index].settle.remote(unit, attempts[unit], choice)] = (unit, index)
            timeout = RESTING_S if waking else WAIT_S
            ready, _ = ray.wait([*running, *pings], num_returns=1, timeout=timeout)
            if time.time() - renewed > WAIT_S:
                plan.out.refresh_driver(token)
                renewed = time.time()
            for ref in ready:
                if ref in pings:
                    index = pings.pop(ref)
                    try:
                        ray.get(ref)
                        free.add(index)
                    except RayActorError:  # still restarting
                        waking[index] = time.time() + RESTING_S
                    continue
                unit, index = running.pop(ref)
                try:
                    done, failure = gather(ray, ref)
                except (RayActorError, WorkerCrashedError, OutOfMemoryError) as exc:
                    waking[index] = time.time()
                    if attempts[unit] < max_attempts:
                        queue.appendleft(unit)
                        continue
                    why = " ".join(str(exc).split())[:300]
                    died = f"its actor died on all {attempts[unit]} attempts ({why})"
                    failed.append(record_failure(plan.out, unit, died))
                    continue
                free.add(index)
                if failure:
                    failed.append((unit, failure[1]))
                else:
                    tally.add(Tally(**done))
                    bar.advance(done["rows"], done["tokens"])
    finally:
        bar.close()
    return tally, failed


def assemble_files(ray, plan: Plan, schema) -> None:
    """Assemble every output file whose units are all done, as Ray tasks (files are independent)."""
    task = ray.remote(num_cpus=1)(assemble_if_ready)
    files = zip(plan.file_names(), plan.groups)
    gather(ray, [task.remote(plan.out, name, group, schema, plan.options) for name, group in files])


def record_actor_stats(ray, workers: list, plan: Plan) -> None:
    """Each actor's figures since it (last) started; an actor still restarting has none to give."""
    from ray.exceptions import RayActorError

    for index, worker in enumerate(workers):
        try:
            figures = gather(ray, worker.figures.remote())
        except RayActorError:
            continue
        plan.out.write_worker_stats("actor", index, len(workers), figures)


def gather(ray, refs):
    """`ray.get`; a `NerbatchError` raised inside an actor or task is raised here as itself (the
    user's one-line message), anything else keeps Ray's error with the remote traceback."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, NerbatchError):
            raise exc.cause from None
        raise


class UnitWorker:
    """One actor: loads the model once (again after a restart) and settles the units it is given."""

    def __init__(self, plan: Plan, index: int, cpus: float):
        self.plan, self.index, self.cpus = probe.node_view(plan), index, cpus
        self.tagger = self.schema = None
        self.tally, self.units, self.failed = Tally(), 0, []
        self.started = time.time()

    def cpu_facts(self) -> dict:
        """What the run's precision depends on, as seen from here: this node's CPU flags, whether the
        actor has a GPU, and the model's precision record."""
        import torch

        from nerbatch.autoprecision import local_model, read_record

        model = local_model(self.plan.options.model)
        evidence = read_record(model) if model else None
        return {"flags": sorted(cpu_flags()), "cuda": torch.cuda.is_available(), "evidence": evidence}

    def load(self, choice: Choice):
        """The model (loaded on the first call, at the run's precision `choice`) and the run's output schema."""
        if self.tagger is None:
            import torch

            from nerbatch.job import describe_run, load_tagger

            torch.set_num_threads(max(1, int(self.cpus)))
            device = "cuda" if torch.cuda.is_available() else None  # Ray gives a GPU actor its device
            self.tagger = load_tagger(self.plan.options, device, choice)
            self.config, self.schema = describe_run(self.plan, self.tagger)
        return self.tagger

    def describe(self, choice: Choice) -> dict:
        """This actor's run config and output schema, resolved on its own device, with its versions;
        opening the first input proves the inputs are in reach from here."""
        from nerbatch.parquet_io import open_parquet

        if self.plan.units:
            open_parquet(self.plan.units[0].location)
        self.load(choice)
        return {"config": self.config, "schema": self.schema, **probe.node_facts()}

    def probe(self, token: str) -> dict:
        """Whether the driver's token is visible from here; leaves this actor's own for the driver."""
        return probe.answer(self.plan.out, token, f"actor-{self.index}")

    def settle(self, unit, attempt: int, choice: Choice):
        """Settle one unit (its `attempt`-th try) at the run's precision `choice`: its tally as a dict,
        or the recorded failure."""
        from nerbatch.job import settle_unit

        tagger = self.load(choice)
        done, failure = settle_unit(unit, tagger, self.plan, self.schema, self.index, attempt=attempt)
        self.units += 1
        if done:
            self.tally.add(done)
            return vars(done), None
        self.failed.append(failure[1])
        return None, failure

    def ping(self) -> bool:
        """Answers once the actor is up (after a restart, too)."""
        return True

    def figures(self) -> dict:
        """What this actor did since it (last) started, as `nerbatch stats` shows per worker."""
        seconds = time.time() - self.started
        return {
            **vars(self.tally),
            "units": self.units,
            "failed": self.failed,
            "wall_seconds": seconds,
            "peak_rss_mb": peak_rss_mb(),
            "pid": os.getpid(),
        }
