"""Queueing arithmetic for capacity planning: Erlang C (M/M/c) waits and the replica count that
keeps a TTFT quantile within its SLO.

A variant replica is modelled as `slots` servers (its decode batch, `max_num_seqs`), each
completing requests at `capacity / slots` per second, where `capacity` is the replica's measured
completion rate at its knee. A fleet of R replicas behind Ray Serve's router is treated as one
pooled M/M/(R * slots) queue: slightly optimistic (the router does not see every replica's queue
at once), which the headroom covers.
"""

from __future__ import annotations

import math

from pydantic import BaseModel


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arriving request waits (Erlang C), for `servers` servers and an
    offered load A = arrival rate / service rate per server (in Erlangs). 1.0 when A >= servers
    (the queue grows without bound)."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    if offered_load < 0:
        raise ValueError(f"offered load must be >= 0, got {offered_load}")
    if offered_load >= servers:
        return 1.0
    # Erlang B by its recurrence, then C from B: no powers or factorials, so no overflow at
    # any fleet size.
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered_load * blocking / (k + offered_load * blocking)
    return servers * blocking / (servers - offered_load * (1 - blocking))


def wait_exceeds(servers: int, arrival_rate: float, service_rate: float, seconds: float) -> float:
    """P(queueing wait > seconds) in M/M/c: C(c, A) * exp(-(c * mu - lambda) * t)."""
    load = arrival_rate / service_rate
    waiting = erlang_c(servers, load)
    if load >= servers:
        return 1.0
    return waiting * math.exp(-(servers * service_rate - arrival_rate) * seconds)


def mean_wait(servers: int, arrival_rate: float, service_rate: float) -> float:
    """Mean queueing wait in M/M/c: C(c, A) / (c * mu - lambda); infinite at or past saturation."""
    if arrival_rate >= servers * service_rate:
        return math.inf
    load = arrival_rate / service_rate
    return erlang_c(servers, load) / (servers * service_rate - arrival_rate)


class ReplicaPlan(BaseModel):
    replicas: int
    utilization: float  # arrival rate / fleet capacity
    p_wait_over_budget: float  # P(queueing wait > the TTFT budget left after prefill)
    mean_wait_seconds: float


def replicas_for_slo(
    arrival_rate: float,
    capacity_per_replica: float,
    slots_per_replica: int,
    wait_budget_seconds: float,
    quantile: float = 0.95,
    headroom: float = 0.2,
    max_replicas: int = 1024,
) -> ReplicaPlan:
    """The fewest replicas for which a request's queueing wait stays within `wait_budget_seconds`
    with probability `quantile`, and the fleet runs at most `1 - headroom` busy."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if capacity_per_replica <= 0 or slots_per_replica < 1:
        raise ValueError("capacity_per_replica must be > 0 and slots_per_replica >= 1")
    service_rate = capacity_per_replica / slots_per_replica
    for replicas in range(1, max_replicas + 1):
        utilization = arrival_rate / (replicas * capacity_per_replica)
        if utilization > 1 - headroom:
            continue
        servers = replicas * slots_per_replica
        tail = wait_exceeds(servers, arrival_rate, service_rate, wait_budget_seconds)
        if tail <= 1 - quantile:
            return ReplicaPlan(
                replicas=replicas,
                utilization=utilization,
                p_wait_over_budget=tail,
                mean_wait_seconds=mean_wait(servers, arrival_rate, service_rate),
            )
    raise ValueError(f"no fleet of up to {max_replicas} replicas meets the SLO")
