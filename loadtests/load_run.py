"""One load run on locust, used as a library: the users of locustfile.py driven in this process,
headless (or with locust's web UI), with a live progress line and a summary of what was measured.

Locust patches the standard library for gevent when it is imported, so a process that runs load
imports this module before anything that starts threads (the `slimserve loadtest` and `slimserve
plan` commands do; a gateway they deploy runs in a process of its own).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any, Literal

import gevent
import locust
from locust.argument_parser import get_parser
from locust.env import Environment
from pydantic import BaseModel, Field, model_validator
from tqdm import tqdm

from slimserve.loadtests import locustfile
from slimserve.loadtests.load_stats import ms, quantiles

log = logging.getLogger("slimserve.loadtests.load_run")


class LoadSpec(BaseModel):
    """One run's load: closed loop (`users` in flight) or open loop (`rate` arrivals/s)."""

    url: str = "http://127.0.0.1:8000"
    model: str = "smollm2-135m-instruct"
    endpoint: Literal["chat", "completions"] = "chat"
    users: int = Field(8, ge=1, description="closed loop: streams; open loop: most in flight")
    rate: float = Field(0.0, ge=0, description="open loop: arrivals per second (0: closed loop)")
    arrival: Literal["poisson", "gamma"] = "poisson"
    burstiness: float = Field(1.0, gt=0, description="gamma shape (1: Poisson)")
    requests: int = Field(0, ge=0, description="stop after this many requests (0: no bound)")
    seconds: float = Field(60.0, gt=0, description="stop after this long")
    drain_seconds: float = Field(30.0, ge=0, description="at the stop, in-flight requests' grace")
    max_tokens: int = Field(64, ge=1)
    prompt_words: int = Field(48, ge=1)
    length_spread: float = Field(0.0, ge=0, lt=1)
    natural_ends: bool = False
    trace: Path | None = None
    trace_timing: bool = False
    queue_timeout: float = Field(0.0, ge=0, description="x-slimserve-queue-timeout (0: none)")
    seed: int = 0
    records: Path = Path("loadtest-records.jsonl")

    @model_validator(mode="after")
    def _bounded(self) -> LoadSpec:
        if self.trace_timing and self.trace is None:
            raise ValueError("trace_timing needs a trace")
        if self.trace is not None and not self.trace.is_file():
            raise ValueError(f"no trace file at {self.trace}")
        return self

    def locust_arguments(self) -> list[str]:
        arguments = [
            f"--host={self.url}",
            f"--records={self.records}",
            f"--model={self.model}",
            f"--endpoint={self.endpoint}",
            f"--max-tokens={self.max_tokens}",
            f"--prompt-words={self.prompt_words}",
            f"--length-spread={self.length_spread}",
            f"--seed={self.seed}",
            f"--rate={self.rate}",
            f"--arrival={self.arrival}",
            f"--burstiness={self.burstiness}",
            f"--requests={self.requests}",
            f"--queue-timeout={self.queue_timeout}",
        ]
        if self.natural_ends:
            arguments.append("--natural-ends")
        if self.trace is not None:
            arguments.append(f"--trace={self.trace}")
        if self.trace_timing:
            arguments.append("--trace-timing")
        return arguments


class _Progress:
    """The live line: completed rate, p50/p95 TTFT over the last requests, errors."""

    def __init__(self, spec: LoadSpec, show: bool) -> None:
        total = spec.requests or None
        self.bar = tqdm(total=total, unit="req", disable=not show, dynamic_ncols=True)
        self.ttfts: list[float] = []
        self.errors = 0
        self.started = time.perf_counter()

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("status") != 200 or record.get("error"):
            self.errors += 1
        elif "ttft_seconds" in record:
            self.ttfts.append(record["ttft_seconds"])
        recent = quantiles(self.ttfts[-200:])
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix_str(
            f"{self.bar.n / elapsed if elapsed else 0:.2f} req/s, TTFT p50 {ms(recent.p50)} ms "
            f"p95 {ms(recent.p95)} ms, errors {self.errors}",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class LoadRunError(RuntimeError):
    """The load itself failed (a user raised, nothing finished): no figures to report."""


class LoadResult(BaseModel):
    records: list[dict[str, Any]]
    seconds: float
    interrupted: bool


def run_load(spec: LoadSpec, progress: bool = True, web_ui_port: int | None = None) -> LoadResult:
    """Drive one run and return every finished request's record (also in spec.records). Ctrl-C
    stops it early and still returns (and has written) what finished."""
    spec.records.parent.mkdir(parents=True, exist_ok=True)
    options = get_parser().parse_args(spec.locust_arguments())
    environment = Environment(
        user_classes=[locustfile.OpenAIUser],
        events=locust.events,  # where locustfile.py's listeners are
        host=spec.url,
        parsed_options=options,
        stop_timeout=spec.drain_seconds,
    )
    runner = environment.create_local_runner()
    if web_ui_port is not None:
        environment.create_web_ui("127.0.0.1", web_ui_port)
        log.info("locust web UI at http://127.0.0.1:%d", web_ui_port)
    records: list[dict[str, Any]] = []
    live = _Progress(spec, progress)
    listeners = [records.append, live]
    locustfile.record_listeners.extend(listeners)
    started = time.perf_counter()
    interrupted = False

    def stop_on_ctrl_c(signum: int, frame: object) -> None:
        # A KeyboardInterrupt would surface in whichever greenlet runs (often a user's record
        # listener) and kill it rather than the run; instead the first Ctrl-C stops the users with
        # their drain and the main greenlet returns what finished. A second one is Python's own.
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, previous_handler)
        log.warning("interrupted: stopping the users, keeping what finished (Ctrl-C again: now)")
        gevent.spawn(runner.quit)

    previous_handler = signal.signal(signal.SIGINT, stop_on_ctrl_c)
    try:
        # Locust warns above 100 users/s; open-loop arrivals wait for spawning to complete.
        runner.start(spec.users, spawn_rate=min(spec.users, 100))
        deadline = gevent.spawn_later(spec.seconds, runner.quit)
        runner.greenlet.join()
        deadline.kill(block=False)
    except KeyboardInterrupt:  # the second Ctrl-C, while the users drain: no more waiting
        interrupted = True
        runner.user_greenlets.kill(block=True)
        runner.greenlet.kill(block=True)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        for listener in listeners:
            locustfile.record_listeners.remove(listener)
        live.close()
        if environment.web_ui is not None:
            environment.web_ui.stop()
    seconds = time.perf_counter() - started
    if runner.exceptions:
        first = next(iter(runner.exceptions.values()))
        raise LoadRunError(f"the load users failed: {first['msg']}\n{first['traceback']}")
    if not records and not interrupted:
        raise LoadRunError(f"no request finished in {seconds:.0f} s against {spec.url}")
    return LoadResult(records=records, seconds=seconds, interrupted=interrupted)
