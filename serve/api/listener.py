"""The gateway replica's own HTTP listener: clients reach the gateway without Serve's proxy hop.

Ray Serve's direct ingress does the same but binds without SO_REUSEADDR, so a gateway replica
restarted after a crash cannot bind its port while the dead one's connections wait out
TIME_WAIT, and Serve then blocks that port for good (loadtests/README.md, "Direct ingress").
Here the socket takes SO_REUSEADDR, so a restarted replica listens where the old one did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from fastapi import FastAPI

from ..ports import bound_socket

log = logging.getLogger(__name__)


# Ray Serve stops a replica by force 20 s into its graceful stop (graceful_shutdown_timeout_s).
DRAIN_SECONDS = 15.0


class GatewayListener:
    """uvicorn serving `app` on the replica's running event loop from a socket bound now, so a
    busy port fails the replica's start (Ray Serve then starts it again)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.sock = bound_socket(host, port)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                lifespan="off",  # Ray Serve already ran the app's lifespan for its own ingress
                access_log=False,
                log_config=None,
                timeout_keep_alive=75,
                timeout_graceful_shutdown=DRAIN_SECONDS,
            )
        )
        # The replica's signals stay Ray's: uvicorn must not take SIGTERM/SIGINT over.
        self.server.capture_signals = contextlib.nullcontext
        self.task = asyncio.get_running_loop().create_task(self.server.serve([self.sock]))
        self.task.add_done_callback(self._ended)
        log.info("the gateway replica listens on %s:%d", host, port)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the gateway's HTTP listener stopped: %r", task.exception())

    async def drain(self) -> None:
        """Take no new connection and let the requests in flight finish (up to DRAIN_SECONDS):
        Serve's own graceful stop counts only the requests that came through its proxy."""
        self.server.should_exit = True
        await self.task
