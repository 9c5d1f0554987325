"""Locust users for an OpenAI-compatible endpoint: each request streams (SSE) and is written to a
JSONL file with its TTFT, mean inter-token latency, end-to-end latency, output tokens and the
variant that served it (the gateway's response header).

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --stop-timeout 60 \\
        --host http://127.0.0.1:8000 --records records.jsonl

Closed loop (the default): each of the `-u` users sends its next request when its last one ends.
Open loop (`--rate R`): requests arrive at R per second (Poisson, or gamma with `--burstiness`,
as `vllm bench serve` draws them) whatever the server does, and up to `-u` of them are in flight
at once; latencies count from the scheduled arrival, so a client that falls behind shows up in
TTFT (and in `client_wait_seconds`) instead of quietly lowering the load (coordinated omission).
Prompts are passages of Python's own documentation (on every machine), or the requests of a
recorded JSONL trace (`--trace`; with `--trace-timing` its `at` offsets are the arrival times).
`--requests N` ends the run after N requests; `-t` bounds its time.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import gevent
from gevent.queue import Queue
from locust import HttpUser, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

# Called with each finished request's record (the library runner's live progress listens here).
record_listeners: list[Callable[[dict[str, Any]], None]] = []


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--records", default="loadtest-records.jsonl", help="JSONL, one per request"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model (or NAME:variant)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="prompt words and max tokens drawn uniformly within +- this fraction",
    )
    parser.add_argument(
        "--natural-ends",
        action="store_true",
        help="let the model stop at its end token (default: exactly --max-tokens per request)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (0: closed)")
    parser.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    parser.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, 1 Poisson"
    )
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: no)")
    parser.add_argument("--trace", default="", help="JSONL of requests to replay")
    parser.add_argument(
        "--trace-timing", action="store_true", help="arrive at the trace's `at` offsets"
    )
    parser.add_argument(
        "--queue-timeout", type=float, default=0.0, help="x-slimserve-queue-timeout (0: none)"
    )


class TraceRequest:
    """One line of a trace: {"prompt": str} or {"messages": [...]}, optional "max_tokens" and
    "at" (seconds from the start)."""

    def __init__(self, line: dict[str, Any]) -> None:
        if "prompt" not in line and "messages" not in line:
            raise ValueError(f"a trace line needs 'prompt' or 'messages': {line}")
        self.prompt: str | None = line.get("prompt")
        self.messages: list[dict[str, Any]] | None = line.get("messages")
        self.max_tokens: int | None = line.get("max_tokens")
        self.at: float | None = line.get("at")


def read_trace(path: str) -> list[TraceRequest]:
    lines = [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]
    if not lines:
        raise ValueError(f"trace {path} has no requests")
    return [TraceRequest(line) for line in lines]


class LoadState:
    """What the users of one run share: the records file, the request count, the arrivals."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        self.environment = environment
        self.records: TextIO = open(options.records, "w")  # noqa: SIM115 (closed at test stop)
        self.limit: int | None = options.requests or None
        self.issued = 0
        self.finished = 0
        self.trace = read_trace(options.trace) if options.trace else None
        self.arrivals: Queue | None = None
        self.dispatcher: gevent.Greenlet | None = None
        if options.rate > 0 or options.trace_timing:
            self.arrivals = Queue()

    def start_arrivals(self) -> None:
        """Once every user is spawned: arrivals before that would wait for users that do not
        exist yet, and count the spawning against the server."""
        if self.arrivals is not None and self.dispatcher is None:
            self.dispatcher = gevent.spawn(self._dispatch, self.environment.parsed_options)

    def arrival_times(self, options: Any) -> Any:
        """Seconds from the start at which requests arrive."""
        if options.trace_timing:
            if self.trace is None or any(t.at is None for t in self.trace):
                raise ValueError("--trace-timing needs a trace whose every line has 'at'")
            yield from sorted(t.at for t in self.trace)
            return
        rng = random.Random(options.seed)
        shape = 1.0 if options.arrival == "poisson" else options.burstiness
        offset = 0.0
        while True:
            offset += rng.gammavariate(shape, 1.0 / (options.rate * shape))
            yield offset

    def _dispatch(self, options: Any) -> None:
        start = time.perf_counter()
        for count, offset in enumerate(self.arrival_times(options)):
            if self.limit is not None and count >= self.limit:
                return
            gevent.sleep(max(0.0, start + offset - time.perf_counter()))
            self.arrivals.put(start + offset)

    def next_start(self) -> float:
        """When the next request counts from: its scheduled arrival (open loop) or now."""
        if self.limit is not None and self.issued >= self.limit:
            raise StopUser()
        self.issued += 1
        if self.arrivals is None:
            return time.perf_counter()
        return self.arrivals.get()

    def write(self, record: dict[str, Any]) -> None:
        self.records.write(json.dumps(record) + "\n")
        self.records.flush()
        for listener in record_listeners:
            listener(record)
        self.finished += 1
        if self.limit is not None and self.finished >= self.limit:
            runner = self.environment.runner
            if runner is not None:
                gevent.spawn(runner.quit)

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.kill(block=False)
        self.records.close()


_states: dict[int, LoadState] = {}


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    _states[id(environment)] = LoadState(environment)


@events.spawning_complete.add_listener
def _spawned(**_: Any) -> None:
    for state in _states.values():
        state.start_arrivals()


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    state = _states.pop(id(environment), None)
    if state is not None:
        state.close()


@functools.lru_cache(maxsize=8)
def _passages(words: int, seed: int) -> list[str]:
    """256 passages of `words` words (built once per process: hundreds of users share them)."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics.values()).split())
    tokens = text.split(" ")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(tokens) - words) for _ in range(256)]
    return [" ".join(tokens[s : s + words]) for s in starts]


def _spread(value: int, spread: float, rng: random.Random) -> int:
    if spread <= 0:
        return value
    return max(1, round(rng.uniform(value * (1 - spread), value * (1 + spread))))


class OpenAIUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.state = _states[id(self.environment)]
        self.rng = random.Random(options.seed * 7919 + id(self) % 1000)
        longest = math.ceil(options.prompt_words * (1 + max(0.0, options.length_spread)))
        self.prompts = _passages(longest, options.seed)

    def _body(self) -> tuple[str, dict[str, Any]]:
        options = self.options
        max_tokens = _spread(options.max_tokens, options.length_spread, self.rng)
        prompt: str | None = None
        messages: list[dict[str, Any]] | None = None
        if self.state.trace is not None:
            request = self.state.trace[(self.state.issued - 1) % len(self.state.trace)]
            prompt, messages = request.prompt, request.messages
            max_tokens = request.max_tokens or max_tokens
        else:
            words = _spread(options.prompt_words, options.length_spread, self.rng)
            prompt = " ".join(self.rng.choice(self.prompts).split(" ")[:words])
        common = {
            "model": options.model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not options.natural_ends:
            common["ignore_eos"] = True
        if options.endpoint == "chat":
            messages = messages or [{"role": "user", "content": f"Summarize: {prompt}"}]
            return "/v1/chat/completions", {**common, "messages": messages}
        if prompt is None:
            raise ValueError("the completions endpoint needs trace lines with 'prompt'")
        return "/v1/completions", {**common, "prompt": prompt}

    @task
    def generate(self) -> None:
        started = self.state.next_start()
        path, body = self._body()
        headers = {}
        if self.options.queue_timeout > 0:
            headers["x-slimserve-queue-timeout"] = str(self.options.queue_timeout)
        record: dict[str, Any] = {
            "endpoint": self.options.endpoint,
            "started": time.time() - (time.perf_counter() - started),
            "client_wait_seconds": time.perf_counter() - started,
        }
        first = last = None
        with self.client.post(
            path, json=body, headers=headers, stream=True, catch_response=True, name=path
        ) as response:
            record["status"] = response.status_code
            record["variant"] = response.headers.get("x-slimserve-variant")
            if response.status_code != 200:
                record["error"] = _error_code(response)
                response.failure(f"HTTP {response.status_code}")
            else:
                for line in response.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        record["error"] = event["error"].get("code")
                        response.failure(f"stream error {record['error']}")
                        break
                    if event.get("usage"):
                        record["prompt_tokens"] = event["usage"]["prompt_tokens"]
                        record["output_tokens"] = event["usage"]["completion_tokens"]
                    if _has_text(event):
                        last = time.perf_counter()
                        first = first if first is not None else last
                else:
                    response.success()
        record["e2e_seconds"] = time.perf_counter() - started
        if first is not None:
            record["ttft_seconds"] = first - started
            tokens = record.get("output_tokens", 0)
            if tokens > 1 and last is not None:
                record["itl_seconds"] = (last - first) / (tokens - 1)
        self.state.write(record)


def _error_code(response: Any) -> str | None:
    if response.status_code == 0:  # requests raised: no HTTP answer at all
        return "connection_failed"
    try:
        return response.json()["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
