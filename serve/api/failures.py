"""What the gateway answers when a variant cannot serve: overloaded (its queue is full, or a
request waited past its deadline) or down (its replica died, it failed to load). All are 503s
that a client may retry (the response carries Retry-After); only "down" moves unpinned traffic
to another variant."""

from __future__ import annotations

from ..engine.limits import VARIANT_UNAVAILABLE, unavailable_error
from ..engine.types import ErrorInfo


class VariantDownError(RuntimeError):
    """A variant's replicas are lost or it failed to load (not merely busy)."""


def overloaded(message: str, code: str) -> ErrorInfo:
    return ErrorInfo(status=503, type="server_overloaded", message=message, code=code)


def queue_full(variant: str) -> ErrorInfo:
    return overloaded(
        f"variant {variant} has as many requests waiting as it queues; retry shortly",
        "queue_full",
    )


def queue_timeout(variant: str, seconds: float) -> ErrorInfo:
    return overloaded(
        f"the request waited {seconds:g} s for variant {variant} without starting and was "
        "dropped; retry shortly (or allow longer with the x-slimserve-queue-timeout header)",
        "queue_timeout",
    )


def would_wait(variant: str, wait: float, seconds: float) -> ErrorInfo:
    return overloaded(
        f"variant {variant} would start the request in about {wait:.1f} s, past its queue "
        f"timeout of {seconds:g} s; refused at once (retry shortly)",
        "overloaded",
    )


def unavailable(variant: str, detail: str) -> ErrorInfo:
    return unavailable_error(f"variant {variant} is unavailable: {detail}")


def is_unavailable(info: ErrorInfo) -> bool:
    return info.code == VARIANT_UNAVAILABLE


def _lost_replica_errors() -> tuple[type[Exception], ...]:
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (
        RayActorError,
        ActorUnavailableError,
        ReplicaUnavailableError,
        DeploymentUnavailableError,
    )


def is_lost_replica(error: Exception) -> bool:
    return isinstance(error, _lost_replica_errors())


def from_backend_exception(variant: str, error: Exception) -> ErrorInfo:
    """The answer for an exception raised by a variant's Ray handle: backpressure, a replica
    that died or cannot be reached (retriable elsewhere), or a failure inside the replica."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(error, BackPressureError):
        return queue_full(variant)
    if is_lost_replica(error):
        return unavailable(variant, f"its replica was lost ({type(error).__name__})")
    return ErrorInfo(
        status=500,
        type="server_error",
        message=f"variant {variant} failed: {type(error).__name__}: {error}",
    )
