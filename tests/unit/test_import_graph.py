"""The import direction the layout promises: each layer imports only itself and the layers below.

    api -> routing -> replica -> engine -> models -> kernels;   compression -> models, kernels
    distill -> compression, models (a replica may distill its student: replica -> distill)

Every import counts, including the lazy ones inside functions, so a shortcut taken "just once"
fails here and not in a reader's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kernels": "slimserve.kernels",
    "models": "slimserve.models",
    "compression": "slimserve.compression",
    "serve": "slimserve.serve",
    "loadtests": "slimserve.loadtests",
    "distill": "slimserve.distill",
}
SERVE_GROUPS = ("api", "routing", "observability", "replica", "engine")
SERVE_TOP = ("app", "cli", "offline_cli")  # the composition roots: may import all of serve
SERVE_SHARED = ("serve.config", "serve.logs", "serve.cpu_placement")  # leaves any layer may use
BELOW_SERVE = ("distill", "compression", "models", "models.paths", "kernels")

# layer -> layers it may import (besides itself)
ALLOWED: dict[str, tuple[str, ...]] = {
    "models.paths": (),
    "kernels": ("models.paths",),
    "models": ("models.paths", "kernels"),
    "compression": ("models", "models.paths", "kernels"),
    "distill": ("compression", "models", "models.paths", "kernels"),
    "serve.observability": (*SERVE_SHARED, *BELOW_SERVE),
    "serve.engine": ("serve.observability", *SERVE_SHARED, *BELOW_SERVE),
    "serve.replica": ("serve.engine", "serve.observability", *SERVE_SHARED, *BELOW_SERVE),
    "serve.routing": ("serve.engine", "serve.observability", *SERVE_SHARED),
    "serve.api": (
        "serve.routing",
        "serve.engine",
        "serve.observability",
        "serve.ports",
        *SERVE_SHARED,
    ),
    "serve.config": BELOW_SERVE,
    "serve.logs": (),
    "serve.cpu_placement": (),
    "serve.ray_settings": (),  # Ray Serve's environment, set by the composition root
    "serve.ports": (),
    "serve.__init__": (),
}


def layer_of(module: str) -> str:
    """`slimserve.serve.api.chat` -> `serve.api`; `slimserve.models.paths` -> `models.paths`."""
    parts = module.split(".")[1:]
    if parts[:2] == ["models", "paths"]:
        return "models.paths"
    if parts[0] == "serve" and len(parts) > 1:
        return f"serve.{parts[1]}"
    return parts[0]


def imports_of(path: Path, module: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module) for every slimserve import in the file, relative ones resolved."""
    package = module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
                # `from . import x` may name a submodule: judge by the submodule
                if not node.module:
                    found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
                    continue
            else:
                target = node.module or ""
            found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("slimserve.")]


def all_modules() -> list[tuple[Path, list[str]]]:
    modules = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            modules.append((path, [*package.split("."), *parts]))
    return modules


def violations() -> list[str]:
    found = []
    for path, module in all_modules():
        source = layer_of(".".join(module))
        if source == "loadtests" or source.removeprefix("serve.") in SERVE_TOP:
            continue  # benchmarks and composition roots sit above everything
        allowed = ALLOWED.get(source)
        assert allowed is not None, f"{path}: layer {source!r} has no rule in ALLOWED"
        for line, target in imports_of(path, module):
            layer = layer_of(target)
            if layer != source and layer not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target}")
    return found


def test_every_import_points_down() -> None:
    assert violations() == []


def test_kernels_and_compression_never_import_serve() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {target}"
        for path, module in all_modules()
        if module[1] in ("kernels", "compression", "models", "distill")
        for line, target in imports_of(path, module)
        if target.startswith("slimserve.serve")
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("slimserve.serve.api.gateway", "serve.api"),
        ("slimserve.serve.config", "serve.config"),
        ("slimserve.models.paths", "models.paths"),
        ("slimserve.models.store", "models"),
        ("slimserve.kernels.native", "kernels"),
    ],
)
def test_layer_names(module: str, layer: str) -> None:
    assert layer_of(module) == layer


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule must be able to fail: a kernels module importing serve is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..serve.config import load_config\n")
    module = ["slimserve", "kernels", "bad"]
    assert imports_of(bad, module) == [(2, "slimserve.serve.config")]
    assert layer_of("slimserve.serve.config") not in ALLOWED["kernels"]
