"""Which cores a node's serving processes run on when an engine binds its compute to some.

vLLM's CPU engine binds its worker's OpenMP threads to cores of its choosing and leaves the
others "for the scheduler and other processes" (one core by default). Left where Linux puts
them, the gateway, Ray's own processes, the variant replica and vLLM's scheduler process still
wake on the bound cores and stall the worker mid-step: on two cores the vLLM variant decoded ~5%
slower through the gateway than in-process, and as fast once those processes were kept on the
free core (loadtests/README.md, "Serving processes off vLLM's compute core").

So `slimserve serve` names the node's cores for engines (ENGINE_CPUS_ENV, inherited by every Ray
process it starts); each variant replica claims them before it builds its engine, since a
replica forked after the move inherits the serving cores; once its engine is up, a replica
whose engine bound itself moves itself and the engine's other processes off those cores; and
`slimserve serve` then moves Ray's processes and the gateway there too. Engines that compute on
every core (the torch engine) bind nothing, and nothing moves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

import psutil

log = logging.getLogger(__name__)

# The cores engines may compute on, as a CPU list ("0-3,6"); set only by `slimserve serve`.
ENGINE_CPUS_ENV = "SLIMSERVE_ENGINE_CPUS"


def format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(set(cpus)))


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as Linux writes them ("0-3,6") -> its CPUs."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{ENGINE_CPUS_ENV}: not a CPU list: {text!r}")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def engine_cpus() -> frozenset[int] | None:
    """The node's cores for engines, where `slimserve serve` named them (else None)."""
    value = os.environ.get(ENGINE_CPUS_ENV)
    return parse_cpus(value) if value else None


def publish_engine_cpus() -> frozenset[int]:
    """Name this process's cores as the engines' for every process started after (before Ray
    starts); a value already set wins."""
    os.environ.setdefault(ENGINE_CPUS_ENV, format_cpus(os.sched_getaffinity(0)))
    return parse_cpus(os.environ[ENGINE_CPUS_ENV])


def claim_engine_cpus() -> None:
    """Run this process on the engines' cores (where named): a variant replica, before it
    builds an engine that computes here or in processes it starts."""
    cpus = engine_cpus()
    if cpus is not None:
        move_process(os.getpid(), cpus)


def move_process(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of a process onto these cores (a process's affinity is its threads'); a
    process or thread that ended meanwhile is skipped. Placement only speeds serving up: a
    refusal (another user's process, cores outside the container's) is logged, not raised."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            continue
        except OSError as error:
            log.warning("process %d stays where it runs, not on cores %s: %s", pid, cpus, error)
            return


def _affinity(process: psutil.Process) -> frozenset[int] | None:
    try:
        return frozenset(process.cpu_affinity())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def bound_cores(processes: Iterable[psutil.Process], cpus: frozenset[int]) -> frozenset[int]:
    """The cores that processes bound themselves to: each one whose affinity is a strict
    subset of `cpus` (what it inherited)."""
    bound: set[int] = set()
    for process in processes:
        affinity = _affinity(process)
        if affinity is not None and affinity < cpus:
            bound |= affinity
    return frozenset(bound)


def keep_replica_off_bound_cores(variant: str) -> None:
    """After a variant's engine started: if its processes bound themselves to some of the
    engines' cores, this replica and the engine's other processes (vLLM's scheduler, helpers)
    move to the rest."""
    cpus = engine_cpus()
    if cpus is None:
        return
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    bound = bound_cores(processes, cpus)
    free = cpus - bound
    if not bound or not free:
        return
    for process in processes:
        if _affinity(process) == cpus:
            move_process(process.pid, free)
    log.info(
        "variant %s: its engine computes on cores %s; this replica and the engine's other "
        "processes run on %s",
        variant,
        format_cpus(bound),
        format_cpus(free),
    )


def keep_ray_off_bound_cores(
    cpus: frozenset[int], is_variant_replica: Callable[[psutil.Process], bool]
) -> None:
    """`slimserve serve`, once every replica is up: where variant replicas moved off their
    engines' cores, this process and Ray's (GCS, raylet, agents, Serve's controller, the
    gateway replica, idle workers, which later replicas are forked from or become) join them
    on the cores they moved to. Variant replicas and their processes are left to themselves."""
    me = psutil.Process()
    everything = [me, *me.children(recursive=True)]
    replicas = [process for process in everything if is_variant_replica(process)]
    skipped = {process.pid for replica in replicas for process in [replica, *_children(replica)]}
    free = cpus
    for replica in replicas:
        affinity = _affinity(replica)
        if affinity is not None and affinity < cpus:  # it moved off its engine's cores
            free &= affinity
    if free == cpus or not free:
        return
    for process in everything:
        if process.pid not in skipped and _affinity(process) == cpus:
            move_process(process.pid, free)
    log.info(
        "engines compute on cores %s: Ray's processes and the gateway run on %s",
        format_cpus(cpus - free),
        format_cpus(free),
    )


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
