"""Engine "torch" in its own process (the engine core), driven over a pipe.

The scheduler and the model's Python run a whole step at a time. On a thread of the replica
they shared the interpreter lock with Ray's per-token streaming, and through Ray Serve the engine
lost about 40% of its in-process throughput. In a child process they share nothing: the replica
only forwards requests and relays each step's events (one message per step, not per token).

Parent side: `EngineProcess`, a `ScoringEngine` (protocol.py) like `TorchEngine`. Child side:
`_child_main`, which loads and compresses the variant, runs a `TorchEngine` and answers the
pipe. The child exits when the pipe closes, so a killed replica never leaves an engine behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
import traceback
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import torch
from pydantic import BaseModel

from slimserve.compression import CompressionReport

from ..config import SlimserveConfig
from ..observability.flops import FlopModel
from .event_channel import closed_by_inbox, try_connect
from .limits import check_score_length, server_error, unavailable_error
from .loop_delivery import deliver_to_streams
from .pacing import StreamPacer
from .threads import configure_threads
from .torch_engine import (
    TorchEngine,
    drain_events,
    gather_targets,
    loop_reply,
)
from .types import EngineEvent, ErrorInfo, ReplyTo, SamplingParams

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5  # how often the child reports its counters
SHUTDOWN_GRACE_S = 10.0


class EngineReady(BaseModel):
    """What the child reports once the variant is loaded, compressed and ready to serve."""

    report: CompressionReport
    cache_status: str
    load_seconds: float
    compress_seconds: float
    flops: FlopModel
    stats: dict[str, Any]


class EngineStartError(RuntimeError):
    pass


# ---- the child -------------------------------------------------------------------------------


class _PipeSink:
    """Sends one step's events to the parent in one message. `live` maps the parent's keys to
    sequences, for aborts; finished ones are dropped as their last event goes out."""

    def __init__(self, conn: Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock
        self.live: dict[int, Any] = {}

    def send(self, message: tuple) -> bool:
        try:
            with self.lock:
                self.conn.send(message)
        except (OSError, EOFError, BrokenPipeError):  # the parent is gone
            return False
        return True

    def deliver(self, items: list[tuple[Any, EngineEvent]]) -> bool:
        try:
            # Under the lock: the reader registers a sequence in `live` under it too, so a
            # request finished in its first step cannot be dropped before it is registered.
            with self.lock:
                for key, event in items:
                    if event.kind in ("done", "error"):
                        self.live.pop(key, None)
                self.conn.send(("events", items))
        except (OSError, EOFError, BrokenPipeError):  # the parent is gone
            return False
        return True

    def finished(self, keys: list[int]) -> None:
        """These requests' events went to their gateway: their streams here end. Call with
        the lock held."""
        for key in keys:
            self.live.pop(key, None)
        with contextlib.suppress(OSError, EOFError, BrokenPipeError):
            self.conn.send(("finished", keys))


class _OutletSink:
    """Sends one step's events of the requests one gateway replica asked to get itself, in
    one message to its inbox (event_channel.py); the replica hears only that they ended.
    Keys are (the parent's key, the inbox's stream). Paced: its streams' deltas are coalesced
    under the variant's message budget here at the source, as the replica paces the streams it
    relays (pacing.py)."""

    paced = True

    def __init__(self, connection: Connection, pipe: _PipeSink) -> None:
        self.connection: Connection | None = connection
        self.pipe = pipe

    def send(self, items: list[tuple[tuple[int, int], EngineEvent]]) -> bool:
        """With the pipe's lock held."""
        if self.connection is not None:
            try:
                self.connection.send(("events", [(stream, event) for (_, stream), event in items]))
                return True
            except (OSError, EOFError, BrokenPipeError):
                log.warning("a gateway replica's event inbox went away; its requests end")
                with contextlib.suppress(OSError):
                    self.connection.close()
                self.connection = None
        return False

    def deliver(self, items: list[tuple[tuple[int, int], EngineEvent]]) -> bool:
        with self.pipe.lock:
            if self.send(items):
                self.pipe.finished([key for (key, _), event in items if _terminal(event)])
                return True
        # The gateway that asked is gone: the replica's calls for these requests end with an
        # error (nobody reads it), and the engine aborts them (the False).
        gone = EngineEvent(
            kind="error", error=server_error("the gateway replica that asked for it is gone")
        )
        self.pipe.deliver([(key, gone) for key in {key for (key, _), _ in items}])
        return False


class _Outlets:
    """One connection per gateway inbox this engine sends to, opened on its first request."""

    def __init__(self, pipe: _PipeSink) -> None:
        self.pipe = pipe
        self._sinks: dict[str, _OutletSink] = {}

    def sink_for(self, reply_to: ReplyTo) -> _OutletSink | None:
        """None when the inbox cannot be reached (the request is relayed instead)."""
        sink = self._sinks.get(reply_to.address)
        if sink is not None and sink.connection is not None:
            return sink
        self._drop_gone()  # a new inbox: a gateway replica may have replaced one
        connection = try_connect(reply_to)
        if connection is None:
            return None
        sink = self._sinks[reply_to.address] = _OutletSink(connection, self.pipe)
        return sink

    def _drop_gone(self) -> None:
        """Forget the inboxes that closed; their connections close here too. Under the pipe's
        lock: the engine thread sends on them under it."""
        with self.pipe.lock:
            for address, sink in list(self._sinks.items()):
                if sink.connection is None or closed_by_inbox(sink.connection):
                    if sink.connection is not None:
                        sink.connection.close()
                        sink.connection = None
                    del self._sinks[address]


def _terminal(event: EngineEvent) -> bool:
    return event.kind in ("done", "error")


def _child_main(conn: Connection, config: dict[str, Any], variant: str) -> None:
    from ..logs import configure_logging
    from ..observability.flops import count_engine_flops
    from .factory import build_torch_engine

    configure_logging()
    cfg = SlimserveConfig.model_validate(config)
    options = cfg.engine_for(variant)
    configure_threads(options, runs_torch_engine=True)
    try:
        built = build_torch_engine(cfg, variant)
        engine = built.engine
        ready = EngineReady(
            report=built.report,
            cache_status=built.cache_status,
            load_seconds=built.load_seconds,
            compress_seconds=built.compress_seconds,
            flops=count_engine_flops(engine),
            stats=engine.stats(),
        )
    except Exception:
        conn.send(("failed", traceback.format_exc()))
        return
    deployment = cfg.deployment_for(variant)
    engine.pace_streams(StreamPacer.for_deployment(deployment))
    conn.send(("ready", ready.model_dump(mode="json")))
    reader = threading.Thread(
        target=_serve_pipe, args=(conn, engine), name="engine-pipe", daemon=True
    )
    reader.start()
    engine.run()  # on this (main) thread; returns once the pipe closes or says shutdown


def _serve_pipe(conn: Connection, engine: TorchEngine) -> None:
    """Takes requests off the pipe until it closes or says shutdown, then stops the engine.
    Runs no tensor math (that would start a second OpenMP team; see TorchEngine.run)."""
    sink = _PipeSink(conn, threading.Lock())
    try:
        _answer_pipe(conn, engine, sink, _Outlets(sink))
    finally:
        engine.stop()


def _answer_pipe(conn: Connection, engine: TorchEngine, sink: _PipeSink, outlets: _Outlets) -> None:
    next_stats = time.monotonic()
    while True:
        # Counters go out every STATS_PERIOD_S, busy or idle.
        if time.monotonic() >= next_stats:
            if not sink.send(("stats", engine.stats())):
                return
            next_stats = time.monotonic() + STATS_PERIOD_S
        try:
            if not conn.poll(max(next_stats - time.monotonic(), 0.0)):
                continue
            message = conn.recv()
        except (EOFError, OSError):
            return  # the replica is gone
        kind = message[0]
        if kind == "generate":
            _admit(engine, sink, outlets, *message[1:])
        elif kind == "abort":
            seq = sink.live.pop(message[1], None)
            if seq is not None:
                engine.abort(seq)
        elif kind == "score":
            _, key, token_ids, targets_only = message
            try:
                engine.submit_score(token_ids, _score_reply(sink, key, token_ids, targets_only))
            except ValueError as error:
                sink.send(("score", key, None, f"ValueError: {error}"))
        elif kind == "shutdown":
            return


def _admit(
    engine: TorchEngine,
    sink: _PipeSink,
    outlets: _Outlets,
    key: int,
    request_id: str,
    prompt_ids: list[int],
    params: dict[str, Any],
    reply_to: dict[str, Any] | None,
) -> None:
    """Queue one request and answer "accepted" (or why not), to its gateway's inbox when it
    named one this process reaches, else over the pipe. Under the send lock, so "accepted"
    leaves before the engine thread's first delta for it."""
    outlet = outlets.sink_for(ReplyTo.model_validate(reply_to)) if reply_to else None
    seq_sink, seq_key = (sink, key) if outlet is None else (outlet, (key, reply_to["stream"]))
    with sink.lock:
        try:
            seq = engine.submit(
                request_id, prompt_ids, SamplingParams.model_validate(params), seq_sink, seq_key
            )
        except Exception as error:  # one bad request must not take the engine down
            log.exception("could not queue request %s", request_id)
            seq = server_error(f"not queued: {error}")
        if isinstance(seq, ErrorInfo):
            first = EngineEvent(kind="error", error=seq)
        else:
            sink.live[key] = seq
            first = EngineEvent(kind="accepted", prompt_tokens=len(prompt_ids))
        if outlet is None or not outlet.send([(seq_key, first)]):
            sink.conn.send(("events", [(key, first)]))
        elif _terminal(first):
            sink.finished([key])


def _score_reply(sink: _PipeSink, key: int, token_ids: list[int], targets_only: bool):
    def reply(logprobs: torch.Tensor | None, error: Exception | None) -> None:
        if error is not None:
            sink.send(("score", key, None, f"{type(error).__name__}: {error}"))
        elif targets_only:
            sink.send(("score", key, gather_targets(logprobs, token_ids), None))
        else:  # float16 halves what crosses the pipe (shadow scoring keeps float16 anyway)
            sink.send(("score", key, logprobs.to(torch.float16), None))

    return reply


# ---- the replica's side ----------------------------------------------------------------------


class EngineProcess:
    """Starts the engine process and blocks until the variant is ready (or failed to load)."""

    serves_any_loop = True  # its reader thread hands events to whichever loop asked

    def __init__(self, cfg: SlimserveConfig, variant: str, startup_timeout_s: float) -> None:
        self.variant = variant
        self.max_model_len = cfg.engine_for(variant).max_model_len
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_child_main,
            args=(child_conn, cfg.model_dump(mode="json"), variant),
            name=f"slimserve-engine-{variant}",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._keys = itertools.count()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._scores: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._dead: str | None = None
        self._closing = False
        self.ready = self._await_ready(startup_timeout_s)
        self.flops = self.ready.flops
        self._stats = dict(self.ready.stats)
        self._reader = threading.Thread(target=self._read, name="engine-pipe", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _await_ready(self, timeout_s: float) -> EngineReady:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._conn.poll(1.0):
                try:
                    kind, payload = self._conn.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return EngineReady.model_validate(payload)
                self._stop_process()
                raise EngineStartError(f"engine of variant {self.variant} failed:\n{payload}")
            if not self._process.is_alive():
                break
        self._stop_process()
        raise EngineStartError(
            f"engine process of variant {self.variant} exited (code "
            f"{self._process.exitcode}) or was not ready within {timeout_s:.0f}s"
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Already running once constructed (the same call as TorchEngine's)."""

    def is_alive(self) -> bool:
        return self._dead is None and self._process.is_alive() and self._reader.is_alive()

    def shutdown(self) -> None:
        self._closing = True
        if self._process.is_alive():
            with contextlib.suppress(RuntimeError):  # the pipe broke: it is going anyway
                self._send(("shutdown",))
        self._stop_process()

    def _stop_process(self) -> None:
        self._process.join(timeout=SHUTDOWN_GRACE_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=SHUTDOWN_GRACE_S)
        with contextlib.suppress(OSError):
            self._conn.close()

    def stats(self) -> dict[str, Any]:
        return {**self._stats, "engine_pid": self._process.pid}

    # ---- requests ----------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, EOFError, BrokenPipeError) as error:
            self._dead = self._dead or f"engine process is gone: {error}"
            raise RuntimeError(self._dead) from error

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineEvent]:
        """Yields accepted, then deltas, then done; or a single error event."""
        return self._stream(request_id, prompt_ids, params, None)

    def forward(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, reply_to: ReplyTo
    ) -> AsyncIterator[EngineEvent]:
        """As generate, but the engine process sends the events to `reply_to` itself; this
        yields only "forwarded" once the request ended there (or all of them, when the engine
        process could not reach that inbox, or an error)."""
        return self._stream(request_id, prompt_ids, params, reply_to)

    async def _stream(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        reply_to: ReplyTo | None,
    ) -> AsyncIterator[EngineEvent]:
        if self._dead is not None:
            yield self._gone(self._dead)
            return
        key = next(self._keys)
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._streams[key] = (asyncio.get_running_loop(), events)
        try:
            route = reply_to.model_dump() if reply_to is not None else None
            self._send(("generate", key, request_id, prompt_ids, params.model_dump(), route))
        except RuntimeError as error:
            self._streams.pop(key, None)
            yield self._gone(str(error))
            return
        try:
            async for event in drain_events(events):
                yield event
        finally:
            # Still registered: the caller left before done, so free the slot in the engine.
            if self._streams.pop(key, None) is not None and self._dead is None:
                with contextlib.suppress(RuntimeError):
                    self._send(("abort", key))

    async def _score(self, token_ids: list[int], targets_only: bool) -> torch.Tensor:
        check_score_length(token_ids, self.max_model_len)
        if self._dead is not None:
            raise RuntimeError(self._dead)
        key = next(self._keys)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._scores[key] = (loop, future)
        try:
            self._send(("score", key, list(token_ids), targets_only))
            return await future
        finally:
            self._scores.pop(key, None)

    async def score(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token log-probabilities at every position: float16 [len(token_ids), vocab] (the
        in-process engine gives float32; float16 halves what crosses the pipe)."""
        return await self._score(token_ids, targets_only=False)

    async def target_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [len(token_ids) - 1]: the log-probability of each next token."""
        return await self._score(token_ids, targets_only=True)

    # ---- the reader thread -------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self._dispatch(message[1])
            elif kind == "score":
                self._resolve_score(*message[1:])
            elif kind == "finished":
                self._dispatch([(key, _FORWARDED) for key in message[1]])
            elif kind == "stats":
                self._stats = message[1]
        if self._closing:
            self._dead = self._dead or "engine process was shut down"
        else:
            code = self._process.exitcode
            self._dead = self._dead or f"engine process of variant {self.variant} exited ({code})"
            log.error("%s", self._dead)
        self._fail_everything()

    def _dispatch(self, items: list[tuple[int, EngineEvent]]) -> None:
        found = []
        for key, event in items:
            stream = self._streams.get(key)
            if stream is None:
                continue  # its caller already left
            if event.kind in ("done", "error", "forwarded"):
                self._streams.pop(key, None)
            found.append((stream, event))
        deliver_to_streams(found)

    def _resolve_score(self, key: int, value: torch.Tensor | None, error: str | None) -> None:
        entry = self._scores.get(key)
        if entry is not None:
            loop_reply(*entry)(value, RuntimeError(error) if error is not None else None)

    def _gone(self, why: str) -> EngineEvent:
        """A request's answer once the engine process is gone: the variant is unavailable (a
        lost replica, which the gateway retries elsewhere), not a server error, until Ray
        Serve's health check restarts the replica."""
        message = f"variant {self.variant} is unavailable: {why}"
        return EngineEvent(kind="error", error=unavailable_error(message))

    def _fail_everything(self) -> None:
        failure = self._gone(self._dead or "its engine process is gone")
        self._dispatch([(key, failure) for key in list(self._streams)])
        for entry in list(self._scores.values()):
            loop_reply(*entry)(None, RuntimeError(self._dead))


_FORWARDED = EngineEvent(kind="forwarded")
