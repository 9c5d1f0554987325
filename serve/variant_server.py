"""One variant: load the model, compress it at startup, serve token streams.

Runs as a Ray Serve deployment (one per variant), and equally in-process for tests and tools.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from slimserve.kernels.dispatch import chosen_backends
from slimserve.serve.config import SlimserveConfig
from slimserve.serve.engine.factory import build_engine
from slimserve.serve.engine.types import EngineEvent, ErrorInfo, GenerateRequest
from slimserve.serve.logs import configure_logging

log = logging.getLogger(__name__)


class VariantServer:
    def __init__(self, variant: str, config: dict[str, Any]) -> None:
        configure_logging()
        started = time.perf_counter()
        self.variant = variant
        cfg = SlimserveConfig.model_validate(config)
        options = cfg.engine_for(variant)
        torch.set_num_threads(options.torch_threads or os.cpu_count() or 1)
        model_name = cfg.model_for(variant)
        built = build_engine(cfg, variant)
        self.engine, self.tokenizer, self.report = built.engine, built.tokenizer, built.report
        self.engine.start()
        self.engine_name = options.name
        self.timings = {
            "load_seconds": round(built.load_seconds, 3),
            "compress_seconds": round(built.compress_seconds, 3),
            "startup_seconds": round(time.perf_counter() - started, 3),
        }
        self.model_name = model_name
        log.info(
            "variant %s ready in %.1fs (load %.1fs, compress %.1fs): %s",
            variant,
            self.timings["startup_seconds"],
            self.timings["load_seconds"],
            self.timings["compress_seconds"],
            self.report.summary(),
        )

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(request.prompt or "").input_ids

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = GenerateRequest.model_validate(request)
        try:
            prompt_ids = self._prompt_ids(req)
        except Exception as error:  # e.g. a chat template that rejects the role order
            info = ErrorInfo(
                status=400, message=f"could not build the prompt: {error}", param="messages"
            )
            yield EngineEvent(kind="error", error=info).model_dump()
            return
        async for event in self.engine.generate(req.request_id, prompt_ids, req.sampling):
            yield event.model_dump()

    async def stats(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "model": self.model_name,
            "weight_bytes": self.report.weight_bytes_after,
            "compression_ratio": self.report.compression_ratio,
            "compression": self.report.model_dump(),
            "engine_name": self.engine_name,
            "kernels": chosen_backends(),
            "engine": self.engine.stats(),
            **self.timings,
        }

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead engine thread restarts the replica."""
        if not self.engine.is_alive():
            raise RuntimeError(f"engine thread of variant {self.variant} is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
