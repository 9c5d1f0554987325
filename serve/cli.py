"""`slimserve` command line: serve, validate, materialize, compress, eval, loadtest, plan,
distill."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from .config import ConfigError, SlimserveConfig, load_config
from .logs import configure_logging
from .ports import PortInUseError

log = logging.getLogger("slimserve.cli")


def _load(path: str, host: str | None = None, port: int | None = None) -> SlimserveConfig:
    config = load_config(path)
    if host is not None:
        config.server.host = host
    if port is not None:
        config.server.port = port
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run_local, shutdown_local

    config = _load(args.config, args.host, args.port)
    started = time.perf_counter()
    stop = threading.Event()
    _stop_on_signals(stop)
    run_local(config)
    # ray.init put its own SIGTERM handler in place (it aborts the process, skipping Serve's
    # graceful drain): ours again.
    _stop_on_signals(stop)
    base = f"http://{config.server.host}:{config.server.port}"
    log.info(
        "slimserve ready in %.1fs: %s/v1 serving %s as variants %s",
        time.perf_counter() - started,
        base,
        config.public_model_name,
        list(config.variants),
    )
    stop.wait()
    log.info("shutting down")
    shutdown_local()
    return 0


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    log.info("config %s is valid: variants %s", args.config, list(config.variants))
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    from slimserve.models.store import resolve_model

    log.info("model %s is at %s", args.model, resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway on a local Ray")
    serve.add_argument("config", help="YAML config, e.g. deploy/configs/default.yaml")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=cmd_serve)

    validate = commands.add_parser("validate", help="check a config file")
    validate.add_argument("config")
    validate.set_defaults(func=cmd_validate)

    materialize = commands.add_parser("materialize", help="prepare a model directory")
    materialize.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    materialize.set_defaults(func=cmd_materialize)

    from slimserve.distill.cli import register_commands as register_distill_commands
    from slimserve.loadtests.plan_cli import register_commands as register_load_commands

    from .offline_cli import register_commands

    register_commands(commands)  # compress, eval
    register_load_commands(commands)  # loadtest, plan
    register_distill_commands(commands)  # distill
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PortInUseError) as error:
        print(f"slimserve: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
