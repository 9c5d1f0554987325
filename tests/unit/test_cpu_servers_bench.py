"""loadtests/cpu_servers_bench.py's llama.cpp options: what `--llamacpp-no-repack` passes to
llama.cpp's server, and that the server's command carries it."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimserve.loadtests.cpu_servers import LlamaCpp, llama_server_spec
from slimserve.loadtests.cpu_servers_bench import llamacpp_options


def test_no_repack_is_passed_to_llama_cpp_only_when_asked() -> None:
    assert llamacpp_options(argparse.Namespace(llamacpp_no_repack=False)) == []
    assert llamacpp_options(argparse.Namespace(llamacpp_no_repack=True)) == ["--no-repack"]


def test_the_servers_command_ends_with_the_extra_options(tmp_path: Path) -> None:
    llamacpp = LlamaCpp(version="0.0.0", root=tmp_path)
    gguf = tmp_path / "model.gguf"
    plain = llama_server_spec(llamacpp, gguf, "llamacpp-q4_1", 8080, slots=4, threads=2)
    extra = llama_server_spec(
        llamacpp, gguf, "llamacpp-q4_1", 8080, slots=4, threads=2, extra=["--no-repack"]
    )
    assert "--no-repack" not in plain.command
    assert extra.command == [*plain.command, "--no-repack"]
    assert plain.command[plain.command.index("-c") + 1] == "512"  # 128 tokens a slot
