"""``smsbridge``: the one command line. Each subcommand is a thin call into a module."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence

from shared.config import ConfigError, Settings, load_settings
from shared.logs import configure_logging

SERVICES = ("ingress", "sender", "callbacks", "normalizer", "reporter")


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    configure_logging(args.service, settings.log_level)
    module = importlib.import_module(f"services.{args.service}.app")
    asyncio.run(module.main(settings))
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from services.admin import ensure_topics_command

    return asyncio.run(ensure_topics_command(_load(args)))


def _cmd_simulate(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"services.simulators.{args.what}")
    result: int = module.cli(args)
    return result


def _cmd_dev(args: argparse.Namespace) -> int:
    from services.dev import run_dev

    return run_dev(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smsbridge", description=__doc__)
    parser.add_argument(
        "--config", help="TOML configuration (default: $SMSBRIDGE_CONFIG)", default=None
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one pipeline service")
    run.add_argument("service", choices=SERVICES)
    run.set_defaults(func=_cmd_run)

    topics = commands.add_parser("topics", help="manage Kafka topics")
    topics.add_argument("action", choices=("ensure",))
    topics.set_defaults(func=_cmd_topics)

    simulate = commands.add_parser("simulate", help="simulated peers and campaigns")
    simulated = simulate.add_subparsers(dest="what", required=True)
    for what, adder in _simulator_parsers().items():
        adder(simulated.add_parser(what))
    simulate.set_defaults(func=_cmd_simulate)

    dev = commands.add_parser("dev", help="run broker, services and simulators locally")
    dev.add_argument("--no-simulators", action="store_true")
    dev.set_defaults(func=_cmd_dev)
    return parser


def _simulator_parsers() -> dict[str, Callable[[argparse.ArgumentParser], None]]:
    adders: dict[str, Callable[[argparse.ArgumentParser], None]] = {}
    for what in ("optimove", "providers", "campaign"):
        module = importlib.import_module(f"services.simulators.{what}")
        adders[what] = module.add_arguments
    return adders


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
