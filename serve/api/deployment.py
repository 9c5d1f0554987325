"""The gateway as a Ray Serve ingress deployment, with live routing changes from user_config."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from ..config import RoutingConfig, SlimserveConfig
from ..engine.event_channel import EventInbox, this_node
from .backends import RayBackend
from .gateway import GatewayCore, create_api
from .listener import GatewayListener

log = logging.getLogger(__name__)


class GatewayDeployment:
    """Ray Serve ingress: built with the variants' handles, serves the gateway's FastAPI app."""

    def __init__(
        self, config: dict[str, Any], variants: dict[str, Any], listen: bool = False
    ) -> None:
        """`listen`: serve the configured host:port from this replica itself (a local
        `slimserve serve`, where Serve's proxy is moved aside); on a cluster clients come
        through Serve's proxy."""
        from ..logs import configure_logging

        configure_logging()
        cfg = SlimserveConfig.model_validate(config)
        # Engine processes and variant replicas on this node send streams' events here.
        node = this_node()
        self.inbox = EventInbox(node) if cfg.server.direct_streams and node is not None else None
        backends = {
            name: RayBackend(name, handle, self.inbox, early_start=early_starts(cfg, name))
            for name, handle in variants.items()
        }
        self.core = GatewayCore(cfg, backends)
        self._user_config = routing_user_config(self.core.config.routing)
        self.api = create_api(self.core)
        server = self.core.config.server
        self.listener = GatewayListener(self.api, server.host, server.port) if listen else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.api

    async def __del__(self) -> None:
        """Ray Serve's graceful stop (after the app's lifespan shutdown): streams in flight on
        the replica's own listener finish before the process goes."""
        if self.listener is not None:
            await self.listener.drain()
        if self.inbox is not None:
            self.inbox.shutdown()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve calls this with the deployment's user_config: at start, and live whenever
        `serve deploy` brings a new one. It takes the routing section (bare or under
        "routing"). The one it was built with is skipped, so a running canary keeps its split.
        """
        routing = RoutingConfig.model_validate(user_config.get("routing", user_config))
        as_dict = routing_user_config(routing)
        if as_dict == self._user_config:
            return
        self.core.apply_routing_section(routing, RoutingConfig.model_validate(self._user_config))
        self._user_config = as_dict
        log.info("reconfigured routing: %s", as_dict)


def early_starts(config: SlimserveConfig, variant: str) -> bool:
    """Whether requests to `variant` go to its replica's door: only a variant of one replica,
    where the door's requests and Serve's calls share one count (replica/early_start.py)."""
    options = config.deployment_for(variant)
    one_replica = options.autoscaling is None and options.replicas == 1
    return config.server.direct_streams and options.early_start and one_replica


def routing_user_config(routing: RoutingConfig) -> dict[str, Any]:
    """The gateway deployment's user_config: the routing section as JSON."""
    return routing.model_dump(mode="json")
