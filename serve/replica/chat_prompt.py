"""Chat messages (and the tools they may call) as the text of a prompt, through the model's
own chat template."""

from __future__ import annotations

import json
from typing import Any


def _tools_message(tools: list[dict]) -> dict[str, str]:
    functions = [tool["function"] for tool in tools]
    return {
        "role": "system",
        "content": "You can call these functions (JSON Schema of their parameters):\n"
        + json.dumps(functions),
    }


def chat_prompt(tokenizer: Any, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text. A template that renders tools itself gets them as they are; one that
    does not (it would drop them in silence) gets them as a system message after the first
    system turn, or first."""
    template = tokenizer.chat_template or ""
    if tools and "tools" not in template:
        at = 1 if messages and messages[0]["role"] == "system" else 0
        messages = [*messages[:at], _tools_message(tools), *messages[at:]]
        tools = None
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
