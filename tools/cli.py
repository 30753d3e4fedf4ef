"""``smsbridge``: the one command line. Each subcommand is a thin call into a module."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from aiokafka.errors import KafkaConnectionError

from services import SERVICES
from shared.config import ConfigError, KafkaSettings, Settings, load_settings, read_configuration
from shared.contract.topics import use_prefix
from shared.kafka.broker.distribution import TOOLS
from shared.kafka.clients import KafkaUnavailable, bootstrap, connection_problem
from shared.kafka.security import java_client_properties
from shared.kafka.service import run
from shared.live_config import LiveConfig
from shared.logs import configure_logging

# `smsbridge simulate <what>`: each module has ``add_arguments(parser)`` and ``cli(args)``.
SIMULATOR_MODULES = {
    "optimove": "simulators.optimove",
    "providers": "simulators.providers",
    "campaign": "simulators.campaign_load",
}


def _load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    # Before any topic name is read: services name their topics while they are being built.
    use_prefix(settings.kafka.topic_prefix)
    args.kafka = settings.kafka  # for the error if Kafka cannot be reached
    return settings


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    configure_logging(args.service, settings.log_level)
    # A wrong password or certificate is one log line and an exit, not a traceback per client.
    if problem := asyncio.run(connection_problem(settings.kafka)):
        logging.getLogger(f"services.{args.service}").error(problem)
        return 1
    module = importlib.import_module(f"services.{args.service}.app")
    live = LiveConfig(settings, args.config, args.service)
    run(live.alongside(module.main(settings)), settings.event_loop)
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from tools.topic_setup import ensure_topics_command

    return asyncio.run(ensure_topics_command(_load(args), fix=args.fix))


def _cmd_handshake(args: argparse.Namespace) -> int:
    from tools.handshake import handshake_command

    return asyncio.run(handshake_command(_load(args), args.tenant))


def _cmd_tenants_check(args: argparse.Namespace) -> int:
    from tools.tenants_check import tenants_check_command

    return tenants_check_command(read_configuration(args.config))


def _cmd_dlq(args: argparse.Namespace) -> int:
    from tools.dead_letters import dlq_list_command, dlq_redrive_command, parse_since

    settings = _load(args)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"--since: {exc}", file=sys.stderr)
        return 2
    # --topic names the topic as sms-bridge does; on the broker it carries [kafka] topic_prefix.
    topic = f"{settings.kafka.topic_prefix}{args.topic}"
    if args.action == "list":
        return asyncio.run(
            dlq_list_command(
                settings, source_topic=topic if args.topic else None, since=since, limit=args.limit
            )
        )
    return asyncio.run(
        dlq_redrive_command(settings, source_topic=topic, since=since, dry_run=args.dry_run)
    )


def _cmd_replay(args: argparse.Namespace) -> int:
    from tools.replay import cli

    return cli(args)


def _cmd_campaign(args: argparse.Namespace) -> int:
    from services.campaigns.client import cli

    return cli(args)


def _cmd_simulate(args: argparse.Namespace) -> int:
    module = importlib.import_module(SIMULATOR_MODULES[args.what])
    result: int = module.cli(args)
    return result


def _cmd_broker(args: argparse.Namespace) -> int:
    from shared.kafka.broker import BrokerError, distribution

    if args.action == "fetch":
        # Never fails `make`: without Java or Maven the embedded broker is Tansu, and says why.
        reason = distribution.unavailable_reason(fetch=True)
        if reason is None:
            print(f"Apache Kafka {distribution.kafka_version()}: {distribution.libs_dir()}")
        else:
            print(f"Apache Kafka unavailable ({reason}); the embedded broker will be Tansu")
        return 0
    # A client tool logs in as the services do ([kafka] security_protocol, sasl_*, ssl_*).
    properties = (
        java_client_properties(_load(args).kafka)
        if args.action in distribution.CLIENT_TOOLS
        else None
    )
    try:
        print(
            distribution.run_tool(args.action, *args.tool_args, client_properties=properties),
            end="",
        )
    except BrokerError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    from tools.dev import run_dev

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
    topics.add_argument(
        "--fix",
        action="store_true",
        help="set drifted configs and raise partition counts where no key moves away from its "
        "state; without it, existing topics are only checked",
    )
    topics.set_defaults(func=_cmd_topics)

    handshake = commands.add_parser(
        "handshake",
        help="register a tenant's campaign endpoint with its Optimove (Flow 1)",
        description="Checks that the tenant's campaign endpoint answers at ingress.public_url "
        "(https:// unless allow_plain_http = true), then posts the signed handshake and prints "
        "Optimove's answer.",
    )
    handshake.add_argument("--tenant", required=True, help="the tenant's slug")
    handshake.set_defaults(func=_cmd_handshake)

    tenants = commands.add_parser("tenants", help="tenant configuration")
    tenants_actions = tenants.add_subparsers(dest="action", required=True)
    tenants_check = tenants_actions.add_parser(
        "check",
        help="check every tenant's configuration and secrets, without printing them",
    )
    tenants_check.set_defaults(func=_cmd_tenants_check)

    dlq = commands.add_parser("dlq", help="dead letters: list them, send them back")
    dlq_actions = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_actions.add_parser("list", help="show dead letters, newest last")
    dlq_list.add_argument("--topic", help="only those that came from this topic")
    dlq_list.add_argument("--limit", type=int, default=50, help="show the newest N (default 50)")
    dlq_redrive = dlq_actions.add_parser(
        "redrive", help="send dead letters back to the topic they came from, each once"
    )
    dlq_redrive.add_argument("--topic", required=True, help="the source topic to re-drive")
    dlq_redrive.add_argument(
        "--dry-run", action="store_true", help="count what would be re-driven, publish nothing"
    )
    for action in (dlq_list, dlq_redrive):
        action.add_argument(
            "--since", help="only dead letters from this ISO 8601 time on (UTC when no zone)"
        )
        action.set_defaults(func=_cmd_dlq)

    from tools.replay import add_arguments as add_replay_arguments

    replay = commands.add_parser(
        "replay", help="plan, or with --execute commit, a move of a stopped group's offsets"
    )
    add_replay_arguments(replay)
    replay.set_defaults(func=_cmd_replay)

    from services.campaigns.client import add_arguments as add_campaign_arguments

    # `smsbridge campaign ...` (the admin API) beside `smsbridge simulate campaign` (a test load).
    campaign = commands.add_parser(
        "campaign", help="campaign status (live with --follow), pause, resume, cancel"
    )
    add_campaign_arguments(campaign)
    campaign.set_defaults(func=_cmd_campaign)

    simulate = commands.add_parser("simulate", help="simulated peers and campaigns")
    simulated = simulate.add_subparsers(dest="what", required=True)
    for what, adder in _simulator_parsers().items():
        adder(simulated.add_parser(what))
    simulate.set_defaults(func=_cmd_simulate)

    broker = commands.add_parser(
        "broker", help="fetch Apache Kafka's jars, or run one of its tools with them"
    )
    broker.add_argument("action", choices=("fetch", *sorted(TOOLS)))
    broker.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    broker.set_defaults(func=_cmd_broker)

    dev = commands.add_parser("dev", help="run broker, services and simulators locally")
    dev.add_argument("--no-simulators", action="store_true")
    dev.set_defaults(func=_cmd_dev)
    return parser


def _simulator_parsers() -> dict[str, Callable[[argparse.ArgumentParser], None]]:
    adders: dict[str, Callable[[argparse.ArgumentParser], None]] = {}
    for what, name in SIMULATOR_MODULES.items():
        module = importlib.import_module(name)
        adders[what] = module.add_arguments
    return adders


def kafka_unreachable(settings: KafkaSettings | None) -> str:
    """One line for a Kafka that cannot be reached (aiokafka's traceback says no more): a
    refused login or certificate when one more connection shows it, else a broker not up."""
    if settings is not None and (problem := asyncio.run(connection_problem(settings))):
        return problem
    where = f" at {bootstrap(settings)}" if settings is not None else ""
    return f"cannot reach Kafka{where}: check [kafka] bootstrap_servers and that the broker is up"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # aiokafka logs each failed connection attempt, bare on stderr where nothing configured
    # logging: the commands report a Kafka they cannot reach themselves, in one line. A service
    # (`run`) logs them again as JSON (shared.logs.configure_logging).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KafkaUnavailable as exc:
        if isinstance(exc.__cause__, KafkaConnectionError):
            print(kafka_unreachable(getattr(args, "kafka", None)), file=sys.stderr)
        else:
            print(f"Kafka is not available: {exc}", file=sys.stderr)
        return 1
    except KafkaConnectionError:
        print(kafka_unreachable(getattr(args, "kafka", None)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
