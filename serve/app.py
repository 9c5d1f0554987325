"""Build the Ray Serve application from a config, and run it on a local Ray."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import psutil

from . import cpu_placement
from .api.access import warn_if_exposed
from .api.deployment import GatewayDeployment, routing_user_config
from .config import DeploymentOptions, SlimserveConfig, load_config
from .ports import reserved_port
from .ray_settings import apply_serve_environment
from .replica.server import VariantReplica

log = logging.getLogger(__name__)

APP_NAME = "slimserve"
VARIANT_PREFIX = "variant-"  # a variant's deployment is VARIANT_PREFIX + its name
# How often a stopping replica looks whether its requests are done (Serve's default 2 s; Serve
# logs each wait, hence not shorter): an idle replica stops 0.5 s in instead of 2 s, and a
# stop of the whole app (gateway first, then the variants) takes 3 s less.
STOP_POLL_SECONDS = 0.5


def build_application(config: SlimserveConfig, listen: bool = False):  # -> ray.serve.Application
    """`listen`: the gateway replica serves config.server's host:port itself (run_local)."""
    from ray import serve

    as_dict = config.model_dump(mode="json")
    variants = {}
    for name in config.variants:
        deployment = serve.deployment(VariantReplica).options(
            name=f"{VARIANT_PREFIX}{name}", **variant_deployment_options(config, name)
        )
        variants[name] = deployment.bind(name, as_dict)
    gateway = serve.deployment(serve.ingress()(GatewayDeployment)).options(
        name="gateway",
        # The gateway only relays streams; it must not take a CPU away from a variant.
        ray_actor_options={"num_cpus": 0, "resources": dict(config.server.gateway_resources)},
        max_ongoing_requests=4096,
        graceful_shutdown_wait_loop_s=STOP_POLL_SECONDS,
        # One replica: its routing state (split, canary, shadow windows) is the gateway's.
        num_replicas=1,
        # The routing section, so `serve deploy` with a new user_config reweights live
        # (GatewayDeployment.reconfigure) without restarting anything.
        user_config=routing_user_config(config.routing),
    )
    return gateway.bind(as_dict, variants, listen)


def variant_deployment_options(config: SlimserveConfig, variant: str) -> dict[str, Any]:
    """Ray Serve options of one variant's deployment, from its `deployment` section."""
    options = config.deployment_for(variant)
    scaling = options.autoscaling
    replicas: dict[str, Any] = (
        {"num_replicas": None, "autoscaling_config": scaling.model_dump()}
        if scaling
        else {"num_replicas": options.replicas}
    )
    return {
        **replicas,
        "max_ongoing_requests": options.max_ongoing_requests,
        # Bounded: beyond it the handle raises BackPressureError, answered 503 + Retry-After.
        "max_queued_requests": options.max_queued_requests,
        "ray_actor_options": {"num_cpus": options.num_cpus, "resources": dict(options.resources)},
        "health_check_period_s": 3,  # a lost replica is noticed (and restarted) sooner
        "health_check_timeout_s": 30,
        "graceful_shutdown_wait_loop_s": STOP_POLL_SECONDS,
    }


def app_builder(args: dict[str, str]):  # -> ray.serve.Application
    """Ray Serve application builder: `import_path: slimserve.serve.app:app_builder` with
    `args: {config: PATH}` in a Serve config file (serve deploy / serve run / KubeRay)."""
    return build_application(load_config(args["config"]))


def logical_cpus_needed(config: SlimserveConfig) -> int:
    wanted = sum(
        config.deployment_for(n).num_cpus * _most_replicas(config.deployment_for(n))
        for n in config.variants
    )
    return max(os.cpu_count() or 1, math.ceil(wanted))


def _most_replicas(options: DeploymentOptions) -> int:
    return options.autoscaling.max_replicas if options.autoscaling else options.replicas


def run_local(config: SlimserveConfig) -> None:
    """Start a local Ray, Serve (without its HTTP proxy) and the app, whose gateway replica
    listens on the configured port; returns once every replica is ready."""
    import ray
    from ray import serve

    warn_if_exposed(config.server)
    cpus = logical_cpus_needed(config)
    if cpus > (os.cpu_count() or 1):
        log.warning(
            "variants reserve %d CPUs on a %d-core machine; they will share cores",
            cpus,
            os.cpu_count(),
        )
    log.info("Ray Serve settings: %s", apply_serve_environment())  # before Ray starts
    # A busy port fails here, not minutes later when the gateway replica starts, and Ray's own
    # processes cannot take it meanwhile (ports.py).
    with reserved_port(config.server.host, config.server.port):
        # address="local": always a fresh Ray of our own, never a cluster another process started.
        engine_cpus = None
        if config.server.keep_serving_off_engine_cores:
            engine_cpus = cpu_placement.publish_engine_cpus()  # inherited by Ray's processes
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        # The gateway replica listens on the configured port itself, so Serve runs no HTTP
        # proxy (one process fewer polling on a small machine).
        # http_options only name the address in Serve's own "ready at" line: nothing binds it.
        serve.start(
            proxy_location="Disabled",
            http_options={"host": config.server.host, "port": config.server.port},
        )
        serve.run(build_application(config, listen=True), name=APP_NAME, route_prefix="/")
    if engine_cpus is not None:  # every replica is up: engines have bound what they bind
        cpu_placement.keep_ray_off_bound_cores(engine_cpus, _is_variant_replica)
    log.info("the gateway replica serves %s:%d itself", config.server.host, config.server.port)


def _is_variant_replica(process: psutil.Process) -> bool:
    """By the title Ray gives an actor's process ("ray::ServeReplica:<app>:<deployment>",
    with ".<method>" while a call runs)."""
    try:
        return f"ServeReplica:{APP_NAME}:{VARIANT_PREFIX}" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def shutdown_local() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
