"""The ``ssegate`` command: serve, check-config, simulate, keys."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any, Callable, Sequence

from ._version import __version__

__all__ = ["main"]


def _run(coro: object) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def _load(path: str | None):  # type: ignore[no-untyped-def]
    from .config import load_config_with_origins

    return load_config_with_origins(path)


def _startup_signals() -> None:
    """Until the server (or the ``--workers`` supervisor) installs its own handlers: SIGHUP is ignored (a reload
    of the config being loaded anyway) and SIGTERM/SIGINT exit 0 at once (nothing is serving yet). A supervisor
    starts its workers with these signals blocked (proxy/workers.py): one sent before this point waits for it."""
    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    if not hasattr(signal, "SIGHUP"):  # Windows
        return
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


def _log_config(path: str | None, config: Any) -> None:
    """One line saying what runs (version, files, providers, pipeline), and a warning for each thing of the
    environment the load left aside (``environment_notes``)."""
    import structlog

    from ._version import __version__
    from .config import environment_notes, layer_files

    log = structlog.get_logger("ssegate.config")
    files = [f for f in layer_files(path) if os.path.exists(f)] if path is not None else []
    log.info("config_loaded", version=__version__, files=files or ["<built-in default>"],
             environment=os.environ.get("SSEGATE_ENVIRONMENT") or None,
             providers=[p.name for p in config.providers], pipeline=[e.name for e in config.pipeline])
    for note in environment_notes(path):
        log.warning("config_environment_note", note=note)


def cmd_serve(args: argparse.Namespace) -> int:
    _startup_signals()
    import attrs

    from .config import ConfigError
    from .errors import GatewayError
    from .gateway import Gateway
    from .log import configure_logging
    from .web_app import create_app, serve

    path = args.config or os.environ.get("SSEGATE_CONFIG")
    try:
        config, origins = _load(path)
        server = config.server
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers))
                     if v is not None}
        if overrides:
            config = attrs.evolve(config, server=attrs.evolve(server, **overrides))
        configure_logging(config.logging)
        gateway = Gateway(config, origins)
    except ConfigError as exc:
        print(f"ssegate: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    _log_config(path, config)
    if config.server.workers > 1:
        from .workers import run_workers

        return run_workers(config.server.workers, sys.argv,
                           shutdown_grace_seconds=config.server.shutdown_grace_seconds)
    app = create_app(gateway, path, configure_logs=True, server_overrides=overrides)
    host, port = config.server.host, config.server.port
    try:
        _run(serve(app, host, port, reuse_port=bool(os.environ.get("SSEGATE_REUSE_PORT"))))
    except OSError as exc:  # binding failed (what had started is stopped again by then)
        print(f"ssegate: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:  # a provider or plugin that cannot start
        print(f"ssegate: cannot start: {exc.message}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Report every problem at once: the config's own, and those of each plugin's settings."""
    from .config import ConfigError, environment_notes, load_layers, structure
    from .config.schema import PipelineEntry
    from .plugin_manager import load_plugins, new_plugin_manager

    problems = []
    try:
        config, origins = _load(args.file)
        entries = config.pipeline
    except ConfigError as exc:
        problems += exc.problems
        try:  # the pipeline may still be checkable when another section is wrong
            data, origins = load_layers(args.file)
            entries = structure(data.get("pipeline", []), tuple[PipelineEntry, ...], origins, ("pipeline",))
        except ConfigError:
            entries = ()  # the layers do not load at all (YAML, a missing variable): reported above
    if entries:
        try:
            load_plugins(entries, new_plugin_manager(), origins)
        except ConfigError as exc:
            problems += exc.problems
    if not problems:
        # What only the whole config can tell (trusted proxies, the metrics port, a Redis backend without
        # redis.url): checked by building the Gateway, as `serve` does, without starting it.
        from .gateway import Gateway

        try:
            Gateway(config, origins)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        problems.sort(key=lambda p: (p.file or "", p.line or 0))
        print("\n".join(str(p) for p in problems), file=sys.stderr)
        return 1
    from .config import layer_files

    layers = [f for f in layer_files(args.file)[1:] if os.path.exists(f)]  # what was merged over the file
    merged = f"; merged with {', '.join(layers)}" if layers else ""
    print(f"{args.file}: OK ({len(config.providers)} providers, {len(config.pipeline)} plugins{merged})")
    for note in environment_notes(args.file):
        print(f"warning: {note}", file=sys.stderr)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import attrs

    from .config.schema import SimulationConfig
    from .simulator_server import serve_simulator

    changes = {k: v for k, v in (("ttft_ms", args.ttft_ms), ("itl_ms", args.itl_ms), ("error_rate", args.error_rate),
                                 ("response_tokens", args.tokens), ("seed", args.seed),
                                 ("ttft_variance_percent", args.ttft_variance), ("itl_variance_percent", args.itl_variance),
                                 ("error_status", args.error_status), ("models", args.models)) if v is not None}
    serve_simulator(args.host, args.port, attrs.evolve(SimulationConfig(), **changes))
    return 0


def _at_least(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}")
        return value
    return parse


def _http_error_status(text: str) -> int:
    value = int(text)
    if not 400 <= value <= 599:
        raise argparse.ArgumentTypeError("must be an HTTP error status, 400-599")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("name at least one model")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssegate", description="Streaming gateway for LLM APIs.")
    parser.add_argument("--version", action="version", version=f"ssegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (embedded default config when none is given)")
    serve.add_argument("--config", "-c", help="YAML config file (default: $SSEGATE_CONFIG, else the embedded default)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file (exit 1 naming file, line and key)")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    sim = sub.add_parser("simulate", help="run the OpenAI-compatible simulator over HTTP")
    sim.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=9100, help="bind port (default 9100)")
    sim.add_argument("--ttft-ms", type=float, help="mean time to first token, ms (default 20)")
    sim.add_argument("--itl-ms", type=float, help="mean time between tokens, ms (default 5)")
    sim.add_argument("--error-rate", type=float,
                     help="probability (0-1) that a request fails with HTTP 500 (default 0)")
    sim.add_argument("--tokens", type=int,
                     help="completion length when the request sets no max_tokens (default 32)")
    sim.add_argument("--seed", type=int, help="random seed, for reproducible answers (default: random)")
    sim.add_argument("--ttft-variance", type=_at_least(0.0), metavar="PERCENT",
                     help="uniform jitter around --ttft-ms, %% (default 10)")
    sim.add_argument("--itl-variance", type=_at_least(0.0), metavar="PERCENT",
                     help="uniform jitter around --itl-ms, %% (default 10)")
    sim.add_argument("--error-status", type=_http_error_status, metavar="STATUS",
                     help="HTTP status of injected errors, 400-599 (default 500; 429 and 503 test retries)")
    sim.add_argument("--models", type=_names, metavar="A,B,...",
                     help="models listed and answered, comma-separated (default gpt-4o-mini, gpt-4o, gpt-3.5-turbo, "
                          "text-embedding-3-small)")
    sim.set_defaults(func=cmd_simulate)

    from .keys_cli import add_parser as add_keys_parser

    add_keys_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
