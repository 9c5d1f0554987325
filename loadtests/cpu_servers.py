"""The CPU servers a user would run instead of slimserve: llama.cpp built from source, GGUF files.

llama.cpp comes from the `llama-cpp-python` sdist (it vendors llama.cpp's sources), built once per
sdist version under `<cache root>/llama.cpp/<version>/` with the machine's best ISA. The GGUF files
(F32 converted from slimserve's materialized HF directory, then quantized) are cached next to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from pydantic import BaseModel

from slimserve.models.paths import cache_root

log = logging.getLogger("slimserve.loadtests.cpu_servers")

SDIST = "llama-cpp-python"
TOOLS = ("llama-server", "llama-quantize", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # the server's web page would be fetched from the network
)
# The CPU level a build targets: "native" (the host's best), or "avx2": what an AVX2-only CPU
# such as AMD Zen 2 runs, built so on a newer one to compare at that level.
ISA_FLAGS = {
    "native": ("-DGGML_NATIVE=ON",),
    "avx2": (
        *("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON"),
        *("-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF"),
        *("-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF"),
        *("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"),
    ),
}


def cmake_flags(isa: str) -> tuple[str, ...]:
    return (*CMAKE_FLAGS, *ISA_FLAGS[isa])


class LlamaCpp(BaseModel):
    """One built llama.cpp: its sources (from the sdist) and its binaries."""

    version: str
    root: Path
    isa: str = "native"  # a key of ISA_FLAGS

    @property
    def source(self) -> Path:
        return self.root / "src"

    @property
    def build_dir(self) -> Path:
        return self.root / ("build" if self.isa == "native" else f"build-{self.isa}")

    def binary(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    def built(self) -> bool:
        return all(self.binary(name).exists() for name in TOOLS)


def _llamacpp_cache() -> Path:
    return cache_root() / "llama.cpp"


def _sdist() -> Path:
    """The `llama-cpp-python` sdist: a cached one, else downloaded with pip."""
    folder = _llamacpp_cache() / "sdist"
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s sdist into %s", SDIST, folder)
    pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    subprocess.run([*pip, SDIST, "-d", str(folder)], check=True)
    return sorted(folder.glob("llama_cpp_python-*.tar.gz"))[-1]


def _sdist_version(sdist: Path) -> str:
    return sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")


def _extract_llamacpp(sdist: Path, target: Path) -> None:
    """Unpack the sdist's vendor/llama.cpp into `target`."""
    log.info("unpacking llama.cpp from %s", sdist.name)
    unpacked = target.parent / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (unpacked / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp").rename(target)
    shutil.rmtree(unpacked)


def _run_logged(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run a build step with its (long, noisy) output appended to `log_path`."""
    with log_path.open("a") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({result.returncode}):\n{_log_tail(log_path)}")


def _cmake_build(llamacpp: LlamaCpp, jobs: int) -> None:
    started = time.perf_counter()
    build_log = llamacpp.build_dir.with_suffix(".log")
    flags = cmake_flags(llamacpp.isa)
    log.info("configuring llama.cpp %s: %s", llamacpp.version, " ".join(flags))
    source, build = str(llamacpp.source), str(llamacpp.build_dir)
    _run_logged(["cmake", "-S", source, "-B", build, *flags], build_log)
    log.info("building %s with -j%d (output: %s)", ", ".join(TOOLS), jobs, build_log)
    targets = ["--target", *TOOLS]
    _run_logged(
        ["cmake", "--build", build, "--config", "Release", *targets, f"-j{jobs}"], build_log
    )
    log.info("built llama.cpp %s in %.0fs", llamacpp.version, time.perf_counter() - started)


def ensure_llamacpp(jobs: int = 2, isa: str = "native") -> LlamaCpp:
    """llama.cpp's server, quantizer and perplexity program, built once per sdist version and
    CPU level (one source tree and one set of GGUF files for every level)."""
    sdist = _sdist()
    version = _sdist_version(sdist)
    llamacpp = LlamaCpp(version=version, root=_llamacpp_cache() / version, isa=isa)
    if llamacpp.built():
        log.info("llama.cpp %s (%s) already built in %s", version, isa, llamacpp.build_dir)
        return llamacpp
    if not (llamacpp.source / "CMakeLists.txt").exists():
        _extract_llamacpp(sdist, llamacpp.source)
    _cmake_build(llamacpp, jobs)
    return llamacpp


# GGUF files -------------------------------------------------------------------------------------

# bf16: what a bf16 CPU user runs at full precision (llama.cpp computes it natively there).
GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_1")


def _gguf_path(llamacpp: LlamaCpp, model: str, kind: str) -> Path:
    return llamacpp.root / "gguf" / f"{model}.{kind}.gguf"


def _convert_hf_to_f32(llamacpp: LlamaCpp, hf_dir: str, target: Path) -> None:
    """llama.cpp's own converter, with the gguf-py that ships next to it."""
    log.info("converting %s to an F32 GGUF", hf_dir)
    staging = target.with_suffix(".partial")
    script = str(llamacpp.source / "convert_hf_to_gguf.py")
    command = [sys.executable, script, hf_dir, "--outtype", "f32", "--outfile", str(staging)]
    env = {**os.environ, "PYTHONPATH": str(llamacpp.source / "gguf-py")}
    _run_logged(command, target.parent / "convert.log", env)
    staging.rename(target)


def _quantize(llamacpp: LlamaCpp, source: Path, target: Path, kind: str) -> None:
    log.info("quantizing %s to %s", source.name, kind.upper())
    staging = target.with_suffix(".partial")
    quantize = str(llamacpp.binary("llama-quantize"))
    _run_logged([quantize, str(source), str(staging), kind.upper()], target.parent / "quantize.log")
    staging.rename(target)


def ensure_gguf(llamacpp: LlamaCpp, model: str, kind: str) -> Path:
    """The model as a GGUF of `kind`: F32 converted from slimserve's materialized HF directory,
    BF16 and Q8_0 made from it by llama-quantize, Q4_1 the file the model ships as (what
    slimserve de-quantizes)."""
    from slimserve.models.store import _embedded_gguf, resolve_model

    if kind == "q4_1":
        return _embedded_gguf(model)
    target = _gguf_path(llamacpp, model, kind)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "f32":
        _convert_hf_to_f32(llamacpp, resolve_model(model), target)
    else:
        _quantize(llamacpp, ensure_gguf(llamacpp, model, "f32"), target, kind)
    return target


# Server processes -------------------------------------------------------------------------------


class ServerSpec(BaseModel):
    """How to start one OpenAI-compatible server and how to tell it is ready."""

    name: str
    command: list[str]
    port: int
    ready_path: str = "/health"
    env: dict[str, str] = {}
    stop_signal: int = signal.SIGTERM

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def llama_server_spec(
    llamacpp: LlamaCpp,
    gguf: Path,
    name: str,
    port: int,
    slots: int,
    threads: int,
    extra: Sequence[str] = (),
) -> ServerSpec:
    """llama-server with one slot per concurrent stream, 128 tokens of context per slot; the
    chat template is the GGUF's. `extra`: more of llama.cpp's own options."""
    command = [
        str(llamacpp.binary("llama-server")),
        *("-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("-np", str(slots), "-t", str(threads), "-c", str(slots * 128)),
        *extra,
    ]
    return ServerSpec(name=name, command=command, port=port)


def slimserve_spec(config: str, port: int) -> ServerSpec:
    """The gateway as a user starts it: `slimserve serve CONFIG`."""
    slimserve = str(Path(sys.executable).parent / "slimserve")
    command = [slimserve, "serve", config, "--port", str(port)]
    # Ctrl-C: Ray's own handler takes SIGTERM in this process and skips the clean shutdown.
    return ServerSpec(name="slimserve", command=command, port=port, stop_signal=signal.SIGINT)


def vllm_spec(model_dir: str, served_name: str, port: int, max_seqs: int) -> ServerSpec:
    """vLLM's OpenAI server for CPU on the materialized model directory."""
    command = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir),
        *("--served-model-name", served_name, "--port", str(port), "--dtype", "bfloat16"),
        *("--max-num-seqs", str(max_seqs), "--max-model-len", "2048", "--enforce-eager"),
    ]
    return ServerSpec(name="vllm", command=command, port=port, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _await_ready(
    process: subprocess.Popen, spec: ServerSpec, log_path: Path, timeout: float
) -> None:
    """Poll the server's readiness path until it answers 200; fail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{spec.name} exited with {process.returncode}:\n{_log_tail(log_path)}"
            )
        try:
            if httpx.get(spec.url + spec.ready_path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{spec.name} not ready after {timeout:.0f}s:\n{_log_tail(log_path)}")


def _stop(process: subprocess.Popen, spec: ServerSpec, grace: float = 60) -> None:
    """Its stop signal, wait, then SIGKILL the server's process group (started as its leader)."""
    process.send_signal(spec.stop_signal)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0fs; killing it", spec.name, grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # also anything it left behind
    process.wait()
    log.info("%s stopped", spec.name)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path, timeout: float = 900) -> Iterator[str]:
    """Start the server, wait until it is ready, yield its base URL; always stop it."""
    log_path = log_dir / f"{spec.name}.log"
    log.info("starting %s (log: %s): %s", spec.name, log_path, " ".join(spec.command))
    started = time.perf_counter()
    with log_path.open("w") as output:
        process = subprocess.Popen(
            spec.command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **spec.env},
            start_new_session=True,
        )
        try:
            _await_ready(process, spec, log_path, timeout)
            log.info("%s ready in %.0fs", spec.name, time.perf_counter() - started)
            yield spec.url
        finally:
            _stop(process, spec)
