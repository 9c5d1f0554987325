"""One variant: load the model, compress it at startup, serve token streams.

Runs as a Ray Serve deployment (one per variant), and equally in-process for tests and tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any

from slimserve.kernels import cpu_isa
from slimserve.kernels.dispatch import chosen_backends, merged_backends

from .. import cpu_placement
from ..config import SlimserveConfig
from ..engine.event_channel import EventOutlet, EventOutlets, this_node
from ..engine.limits import unavailable_error
from ..engine.pacing import StreamPacer, paced_batches
from ..engine.protocol import Engine, ForwardingEngine
from ..engine.threads import configure_threads
from ..engine.types import EngineEvent, ErrorInfo, GenerateRequest, TokenLogprob
from ..logs import configure_logging
from ..observability.memory import memory_stats
from .bench import bench_variant, run_deferred_self_bench
from .chat_prompt import chat_prompt
from .early_start import EarlyStarts
from .scoring import score_reference
from .student import with_student

log = logging.getLogger(__name__)


class VariantServer:
    def __init__(self, variant: str, config: dict[str, Any]) -> None:
        configure_logging()
        self.variant = variant
        self.node_id = this_node()
        # Why this variant cannot serve, when it failed to load: the replica stays up to say
        # so (to the gateway's probe and every request) while the other variants serve.
        self.failure: str | None = None
        try:
            self._load(SlimserveConfig.model_validate(config))
        except Exception as error:
            self.failure = f"it failed to load: {type(error).__name__}: {error}"
            log.exception("variant %s failed to load", variant)

    def _load(self, cfg: SlimserveConfig) -> None:
        started = time.perf_counter()
        variant = self.variant
        cfg = with_student(cfg, variant)
        options = cfg.engine_for(variant)
        in_process = options.name == "torch" and not options.separate_process
        # A replica forked after `slimserve serve` moved Ray's processes off an engine's cores
        # inherits theirs: its engine (and any process it starts) computes on the node's.
        cpu_placement.claim_engine_cpus()
        configure_threads(options, runs_torch_engine=in_process)
        model_name = cfg.model_for(variant)
        # Imported here: transformers takes seconds to import, and the process that builds the
        # Ray Serve app (`slimserve serve`) imports this module without loading any model.
        from ..engine.factory import build_engine

        built = build_engine(cfg, variant)
        self.engine: Engine = built.engine
        # The same engine, when it can send events to the gateway's inbox itself.
        self._forwarder = self.engine if isinstance(self.engine, ForwardingEngine) else None
        self.tokenizer, self.report = built.tokenizer, built.report
        self.cache_status = built.cache_status
        self.engine.start()
        cpu_placement.keep_replica_off_bound_cores(variant)
        self.engine_name = options.name
        self.dtype = options.dtype
        self.cpu = cpu_isa.describe()
        self.max_model_len = options.max_model_len
        self.bench = bench_variant(self.engine, self.tokenizer, cfg, variant)
        deployment = cfg.deployment_for(variant)
        self.pacer = StreamPacer.for_deployment(deployment)
        self._config = cfg
        self._bench_task: asyncio.Task | None = None
        self.timings = {
            "load_seconds": round(built.load_seconds, 3),
            "compress_seconds": round(built.compress_seconds, 3),
            "self_bench_seconds": self.bench.seconds,
            "startup_seconds": round(time.perf_counter() - started, 3),
        }
        self.model_name = model_name
        # Who was to send each request's events to the gateway: the engine process itself
        # (it relays them here if it cannot reach the inbox), this replica straight to the
        # inbox, or this replica through Ray Serve's stream.
        self.streams = {"from_engine": 0, "from_replica": 0, "through_serve": 0}
        self.outlets = EventOutlets()
        # The door for requests started before their Serve call, opened on the first stats
        # call (the gateway learns it from the answer), on the loop the replica serves on.
        self.early: EarlyStarts | None = None
        self._opens_door = cfg.server.direct_streams and deployment.early_start
        log.info(
            "variant %s ready in %.1fs (load %.1fs, compress %.1fs, cache %s; %s on %s, "
            "CPU kernels at ISA level %s): %s",
            variant,
            self.timings["startup_seconds"],
            self.timings["load_seconds"],
            self.timings["compress_seconds"],
            self.cache_status,
            self.dtype,
            self.engine_name,
            self.cpu["isa"],
            self.report.summary(),
        )

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            text = chat_prompt(self.tokenizer, request.messages, request.tools)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        return self.tokenizer(request.prompt or "").input_ids

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one server per replica, for its life)
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _label(self, entries: Iterable[TokenLogprob | None]) -> None:
        """Fill in the text of each token (and alternative) a log-probability entry names."""
        for entry in entries:
            if entry is None:
                continue
            entry.token = self._token_text(entry.token_id)
            for alternative in entry.top:
                alternative.token = self._token_text(alternative.token_id)

    def _describe_prompt(
        self, event: EngineEvent, request: GenerateRequest, prompt_ids: list[int]
    ) -> None:
        """A prompt event's text and its tokens' texts (what echo answers with)."""
        event.text = (
            request.prompt if request.prompt is not None else self.tokenizer.decode(prompt_ids)
        )
        event.token_texts = [self._token_text(token) for token in prompt_ids]
        self._label(event.prompt_logprobs or ())

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """The request's events, a batch per message (see engine/pacing.py), as plain dicts; nothing
        when they went to the gateway's inbox (`reply_to`) straight from the engine process or
        from here. With the door open, the call first waits for a place its requests leave
        (early_start.py)."""
        why = self._unavailable()
        if why is not None:
            info = unavailable_error(f"variant {self.variant} is unavailable: {why}")
            yield [EngineEvent(kind="error", error=info).model_dump()]
            return
        req = GenerateRequest.model_validate(request)
        # Closing this call closes what it iterates at once, so the engine drops the request
        # before the close returns: a retry finds its queue place free.
        async with (
            self.early.serve_call() if self.early is not None else contextlib.nullcontext(),
            contextlib.aclosing(self._serve(req)) as batches,
        ):
            async for batch in batches:
                yield batch

    async def _serve(self, req: GenerateRequest) -> AsyncIterator[list[dict[str, Any]]]:
        sender, outlet = self._sender(req)
        if outlet is not None:
            await self._to_inbox(req, sender, outlet)
            return
        self.streams[sender] += 1
        events = self._events(req, forward=sender == "from_engine")
        async with contextlib.aclosing(paced_batches(events, self.pacer)) as batches:
            async for batch in batches:
                yield [event.model_dump() for event in batch]

    def _early_run(self, req: GenerateRequest) -> Coroutine[Any, Any, None] | None:
        """A door request's whole run, every event to the gateway's inbox; None when this
        replica cannot send there."""
        if req.reply_to is None:
            return None
        sender, outlet = self._sender(req)
        if sender == "through_serve":
            return None
        outlet = outlet or self.outlets.outlet_for(req.reply_to)
        return None if outlet is None else self._to_inbox(req, sender, outlet)

    async def _to_inbox(self, req: GenerateRequest, sender: str, outlet: EventOutlet) -> None:
        """The request's events that come through this replica, sent to the gateway's inbox
        (the engine process sends the rest itself when `sender` is "from_engine")."""
        assert req.reply_to is not None
        self.streams[sender] += 1
        events = self._events(req, forward=sender == "from_engine")
        async with contextlib.aclosing(paced_batches(events, self.pacer)) as batches:
            async for batch in batches:
                if not outlet.send([(req.reply_to.stream, event) for event in batch]):
                    return  # the gateway that asked is gone: closing the events aborts it

    def _sender(self, req: GenerateRequest) -> tuple[str, EventOutlet | None]:
        """Who sends this request's events to the gateway (a key of `streams`), and this
        replica's connection to the gateway's inbox when it is this replica. The engine process
        does when the gateway is on this node, the engine can, and no event needs this
        replica's tokenizer (log-probabilities and echo are labelled here)."""
        reply_to = req.reply_to
        if reply_to is None or reply_to.node_id != self.node_id:
            return "through_serve", None
        if self._forwarder is not None and not req.labels_tokens:
            return "from_engine", None
        outlet = self.outlets.outlet_for(reply_to)
        return ("from_replica", outlet) if outlet is not None else ("through_serve", None)

    async def _events(self, req: GenerateRequest, forward: bool) -> AsyncIterator[EngineEvent]:
        """The request's events, their tokens' texts filled in. With `forward` the engine
        process sends them to the gateway's inbox itself, and this ends when it says they did."""
        try:
            prompt_ids = self._prompt_ids(req)
        except Exception as error:  # e.g. a chat template that rejects the role order
            info = ErrorInfo(
                status=400, message=f"could not build the prompt: {error}", param="messages"
            )
            yield EngineEvent(kind="error", error=info)
            return
        # The engine sends a prompt event only with prompt log-probabilities; echo without
        # them is answered here.
        echo_here = req.echo and req.sampling.prompt_logprobs is None
        if forward and self._forwarder is not None and req.reply_to is not None:
            engine_events = self._forwarder.forward(
                req.request_id, prompt_ids, req.sampling, req.reply_to
            )
        else:
            engine_events = self.engine.generate(req.request_id, prompt_ids, req.sampling)
        async with contextlib.aclosing(engine_events):
            async for event in engine_events:
                if event.kind == "forwarded":  # the engine sent the events to the gateway itself
                    return
                if event.kind == "prompt":
                    self._describe_prompt(event, req, prompt_ids)
                elif event.kind == "delta" and event.logprobs:
                    self._label(event.logprobs)
                yield event
                if event.kind == "accepted" and echo_here:
                    prompt = EngineEvent(kind="prompt")
                    self._describe_prompt(prompt, req, prompt_ids)
                    yield prompt

    async def score(self, request: dict[str, Any], reference: str, limit: int) -> dict[str, Any]:
        """Next-token log-probs of the request's prompt + `reference` (see serve.scoring)."""
        why = self._unavailable()
        if why is not None:
            raise RuntimeError(f"variant {self.variant} is unavailable: {why}")
        req = GenerateRequest.model_validate(request)
        reference_ids = self.tokenizer(reference, add_special_tokens=False).input_ids
        limit = min(limit, self.max_model_len)
        result = await score_reference(self.engine, self._prompt_ids(req), reference_ids, limit)
        return result.as_dict()

    def _sparsity(self) -> float:
        for method in reversed(self.report.methods):
            if "achieved_sparsity" in method.detail:
                return float(method.detail["achieved_sparsity"])
        return 0.0

    async def _self_bench_done(self) -> None:
        """A pending self-benchmark (engine "vllm") starts on the first stats call, on the
        serving loop; stats waits for it, so the variant reports ready once benchmarked."""
        if not self.bench.self_bench_pending:
            return
        if self._bench_task is None:
            self._bench_task = asyncio.get_running_loop().create_task(
                run_deferred_self_bench(
                    self.bench, self.engine, self.tokenizer, self._config, self.variant
                )
            )
        await asyncio.shield(self._bench_task)

    async def stats(self) -> dict[str, Any]:
        why = self._unavailable()
        if why is not None:  # the gateway takes the variant out of routing while this lasts
            return {"variant": self.variant, "failed": why}
        await self._self_bench_done()
        self._open_door()
        engine = self.engine.stats()
        return {
            "variant": self.variant,
            "pid": os.getpid(),  # the replica's process, for operators (and fault drills)
            "node_id": self.node_id,  # the Ray node it runs on (None in-process)
            "model": self.model_name,
            "weight_bytes": self.report.weight_bytes_after,
            "compression_ratio": self.report.compression_ratio,
            "compression": self.report.model_dump(),
            "compression_methods": [m.method for m in self.report.methods],
            "sparsity": self._sparsity(),
            "engine_name": self.engine_name,
            "dtype": self.dtype,
            "cpu": self.cpu,
            "cache_status": self.cache_status,
            "kernels": merged_backends(chosen_backends(), engine.get("kernels", {})),
            "engine": engine,
            "streams": dict(self.streams) | (self.early.counts if self.early else {}),
            # Popped by the gateway's backend (api/backends.py), never shown to clients.
            **({"door": self.early.door.model_dump()} if self.early else {}),
            **self.bench.model_dump(exclude={"seconds", "self_bench_pending"}),
            "memory": memory_stats().model_dump(),
            **self.timings,
        }

    def _open_door(self) -> None:
        """The door (early_start.py), once, on the loop the replica serves
        on; only inside Ray, where a gateway replica can share the node."""
        if self.early is None and self._opens_door and self.node_id is not None:
            self.early = EarlyStarts(
                self.node_id,
                self._early_run,
                self._config.deployment_for(self.variant).max_ongoing_requests,
                asyncio.get_running_loop(),
            )

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead engine (process or thread) restarts the
        replica."""
        if self.failure is None and not self.engine.is_alive():
            raise RuntimeError(f"the engine of variant {self.variant} is not running")

    def _unavailable(self) -> str | None:
        """Why this replica cannot serve: its variant failed to load (for good), or its engine
        stopped (the OOM killer takes the process that holds the weights), until Ray Serve's
        health check restarts the replica."""
        if self.failure is not None:
            return self.failure
        if not self.engine.is_alive():
            return "its engine stopped running; the replica is being restarted"
        return None

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        early = getattr(self, "early", None)
        if early is not None:
            early.close()
        outlets = getattr(self, "outlets", None)
        if outlets is not None:
            outlets.close()


# How long a graceful stop waits for the requests running through the door (no Serve call), within
# Ray Serve's graceful_shutdown_timeout_s (20 s), which its wait for its own calls shares.
EARLY_DRAIN_S = 10.0


class VariantReplica(VariantServer):
    """A VariantServer as Ray Serve runs it: its graceful stop first lets the requests started
    at its door end (Serve waits only for its own calls)."""

    async def __del__(self) -> None:  # Ray Serve awaits it; outside Serve, VariantServer's
        early = getattr(self, "early", None)
        if early is not None:
            await early.drain(EARLY_DRAIN_S)
        super().__del__()
