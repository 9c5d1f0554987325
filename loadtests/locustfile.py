"""Locust users for an OpenAI-compatible endpoint: each request streams (SSE) and is written to a
JSONL file with its TTFT, mean inter-token latency, end-to-end latency, output tokens and the
variant that served it (the gateway's response header).

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --stop-timeout 60 \\
        --host http://127.0.0.1:8000 --records records.jsonl

Closed loop: each user sends its next request when the last one ends. Prompts are passages of
Python's own documentation (on every machine), `--prompt-words` long.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, TextIO

from locust import HttpUser, constant, events, task
from locust.env import Environment

_records: dict[str, TextIO] = {}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--records", default="loadtest-records.jsonl", help="JSONL, one per request"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model (or NAME:variant)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)


@events.test_start.add_listener
def _open_records(environment: Environment, **_: Any) -> None:
    _records["file"] = open(environment.parsed_options.records, "w")  # noqa: SIM115 (until stop)


@events.test_stop.add_listener
def _close_records(**_: Any) -> None:
    handle = _records.pop("file", None)
    if handle is not None:
        handle.close()


def _passages(words: int, seed: int) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics.values()).split())
    tokens = text.split(" ")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(tokens) - words) for _ in range(256)]
    return [" ".join(tokens[s : s + words]) for s in starts]


class OpenAIUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.prompts = _passages(options.prompt_words, options.seed + id(self) % 1000)

    def _body(self, prompt: str) -> tuple[str, dict[str, Any]]:
        common = {
            "model": self.options.model,
            "max_tokens": self.options.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.endpoint == "chat":
            return "/v1/chat/completions", {
                **common,
                "messages": [{"role": "user", "content": f"Summarize: {prompt}"}],
            }
        return "/v1/completions", {**common, "prompt": prompt}

    @task
    def generate(self) -> None:
        path, body = self._body(random.choice(self.prompts))
        record: dict[str, Any] = {"endpoint": self.options.endpoint, "started": time.time()}
        started = time.perf_counter()
        first = last = None
        with self.client.post(
            path, json=body, stream=True, catch_response=True, name=path
        ) as response:
            record["status"] = response.status_code
            record["variant"] = response.headers.get("x-slimserve-variant")
            if response.status_code != 200:
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
        handle = _records.get("file")
        if handle is not None:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
