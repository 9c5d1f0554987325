import os
from pathlib import Path

import pytest
import torch

from slimserve.kernels import cpu_isa, native
from slimserve.kernels.cpu_isa import Isa
from slimserve.serve.config import ConfigError, load_config, parse_config
from slimserve.serve.engine.threads import configure_threads

ROOT = Path(__file__).resolve().parents[2]


def _base(**overrides):
    data = {"model": "m", "variants": {"full": {}, "int8": {}}}
    data.update(overrides)
    return data


def test_default_config_loads():
    config = load_config(ROOT / "deploy/configs/default.yaml")
    assert set(config.variants) == {"full", "int8"}
    assert config.variants["int8"].compression[0].method == "int8-weight-only"
    assert config.effective_split() == {"full": 0.5, "int8": 0.5}
    assert config.routing.sticky_header == "x-user-id"


SHIPPED_CONFIGS = sorted((ROOT / "deploy/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    try:
        config = load_config(path)
    except ConfigError as error:
        # Compressed vLLM variants need AVX-512 VNNI: below it they are refused by name.
        assert cpu_isa.active() < Isa.AVX512, error
        assert "engine 'vllm' runs compressed checkpoints on CPU only with AVX-512" in str(error)
        return
    assert config.variants
    assert abs(sum(config.effective_split().values()) - 1.0) < 1e-9


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_base(variantz={}), "variantz"),
        (_base(variants={}), "variants"),
        (_base(variants={"Bad Name": {}}), "variants"),
        (_base(routing={"split": {"full": 1, "nope": 1}}), "nope"),
        (_base(routing={"split": {"full": -1}}), "routing.split"),
        (_base(routing={"split": {"full": 0, "int8": 0}}), "routing.split"),
        (_base(routing={"sticky_key": "cookie:x"}), "routing.sticky_key"),
        (_base(engine={"max_num_seqs": 0}), "engine.max_num_seqs"),
        (_base(engine={"dtype": "int7"}), "engine.dtype"),
        (_base(engine={"kernel_threads": 0}), "engine.kernel_threads"),
        (_base(server={"port": 70000}), "server.port"),
        (
            _base(variants={"q": {"compression": [{"method": "int8-weight-only", "bits": 3}]}}),
            "variants.q.compression.0",
        ),
        (
            _base(variants={"q": {"compression": [{"method": "no-such-method"}]}}),
            "variants.q.compression.0",
        ),
    ],
)
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert field in str(error.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_per_variant_overrides():
    config = parse_config(
        _base(variants={"full": {}, "big": {"engine": {"max_num_seqs": 4}, "model": "other"}})
    )
    assert config.engine_for("big").max_num_seqs == 4
    assert config.engine_for("full").max_num_seqs == config.engine.max_num_seqs
    assert config.model_for("big") == "other"
    assert config.model_for("full") == "m"
    # no split configured: everything goes to the first variant
    assert config.effective_split() == {"full": 1.0}


def test_specs_are_checked_against_the_models_architecture(tmp_path, tiny_model_dir):
    config = tmp_path / "bad.yaml"
    # the tiny model's hidden size is 64: groups of 128 cannot tile it
    config.write_text(
        f"model: {tiny_model_dir}\n"
        "variants:\n  full: {}\n"
        "  w4: {compression: [{method: rtn, bits: 4, group_size: 128}]}\n"
    )
    with pytest.raises(ConfigError, match=r"variants\.w4\.compression\.0: group_size 128"):
        load_config(config)
    config.write_text(
        f"model: {tiny_model_dir}\n"
        "variants:\n  w4: {compression: [{method: rtn, bits: 4, group_size: 32}]}\n"
    )
    assert load_config(config).variants["w4"].compression[0].group_size == 32


@pytest.fixture
def forced_isa(monkeypatch):
    """Set SLIMSERVE_CPU_ISA for one test (a lower level than the CPU's own)."""

    def force(level: str) -> None:
        monkeypatch.setenv(cpu_isa.ISA_ENV, level)
        cpu_isa.active.cache_clear()

    yield force
    monkeypatch.undo()
    cpu_isa.active.cache_clear()


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    return set(info.read_text().split()) if info.exists() else set()


def test_dtype_auto_is_bf16_only_where_the_cpu_has_it(forced_isa):
    config = parse_config(_base(variants={"full": {}, "f16": {"engine": {"dtype": "float16"}}}))
    assert config.engine.dtype == "auto"
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags()) and "avx512_vnni" in (
        _cpu_flags()
    )
    native_bf16 = native_bf16 and cpu_isa.active() == Isa.AVX512  # not under a forced avx2
    assert config.engine_for("full").dtype == ("bfloat16" if native_bf16 else "float32")
    assert config.engine_for("f16").dtype == "float16"  # a set dtype is kept
    forced_isa("avx2")
    assert config.engine_for("full").dtype == "float32"  # as on AMD Zen 2


def test_compressed_vllm_variants_are_refused_below_avx512(forced_isa):
    vllm = {"name": "vllm"}
    data = _base(
        variants={
            "full": {"engine": vllm},
            "w4": {"engine": vllm, "compression": [{"method": "rtn", "bits": 4}]},
        }
    )
    forced_isa("avx2")
    with pytest.raises(ConfigError, match=r"variants\.w4: .*ISA level avx2"):
        parse_config(data)
    del data["variants"]["w4"]
    assert parse_config(data).engine_for("full").name == "vllm"  # full precision still runs


def test_kernel_threads_reach_the_native_kernels():
    """The engine process's thread set-up hands `engine.kernel_threads` (default: every core
    this process may use) to slimserve's own kernels, and torch keeps its own count."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("slimserve's native CPU kernels do not load here")
    torch_threads = torch.get_num_threads()
    try:
        configure_threads(parse_config(_base(engine={"kernel_threads": 3})).engine, True)
        assert kernels.threads == 3
        cores = len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == max(1, cores - 1)  # one left for serving
        options = parse_config(_base()).engine
        configure_threads(options, runs_torch_engine=True)
        assert kernels.threads == options.native_kernel_threads() == cores
        configure_threads(parse_config(_base(engine={"kernel_threads": 3})).engine, False)
        assert kernels.threads == cores  # a replica without the model leaves the kernels be
    finally:
        kernels.set_threads(1)
        torch.set_num_threads(torch_threads)
