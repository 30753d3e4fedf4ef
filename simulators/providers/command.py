"""``smsbridge simulate providers``: its options, and the callback URLs it derives."""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

from shared.config import ConfigError, Settings, configured_path, load_settings, split_listen
from shared.kafka.service import run, serve_until_signalled
from shared.logs import configure_logging
from shared.providers import callback_url
from simulators.providers.options import OptionsError, SimulatorOptions
from simulators.providers.server import ProviderSimulator

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8091"
# Providers whose callback URL is set once in their dashboard, not per request.
DASHBOARD_CALLBACK_KINDS = frozenset({"opensms", "octopush"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SimulatorOptions()
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to serve on")
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=defaults.fail_rate,
        help="fraction of accepted sends whose final status is failed",
    )
    parser.add_argument(
        "--http-error-rate",
        type=float,
        default=defaults.http_error_rate,
        help="fraction of sends answered 500 without sending",
    )
    parser.add_argument(
        "--rate-limited-rate",
        type=float,
        default=defaults.rate_limited_rate,
        help="fraction of sends answered 429 (in the provider's shape) without sending",
    )
    parser.add_argument(
        "--rate-limited-wait-s",
        type=float,
        default=defaults.rate_limited_wait_s,
        help="the wait a 429 asks for",
    )
    parser.add_argument(
        "--garbled-rate",
        type=float,
        default=defaults.garbled_rate,
        help="fraction of sends accepted but answered with an unreadable body",
    )
    parser.add_argument("--callback-delay-ms", type=float, default=defaults.callback_delay_ms)
    parser.add_argument("--callback-attempts", type=int, default=defaults.callback_attempts)
    parser.add_argument(
        "--callback-retry-delay-ms", type=float, default=defaults.callback_retry_delay_ms
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--callback-url",
        action="append",
        default=[],
        metavar="KEY=URL",
        help="callback URL of the OpenSMS/Octopush account with this API key (or login); "
        "repeatable, added to those derived from --config",
    )


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "latency_ms": args.latency_ms,
        "fail_rate": args.fail_rate,
        "http_error_rate": args.http_error_rate,
        "rate_limited_rate": args.rate_limited_rate,
        "rate_limited_wait_s": args.rate_limited_wait_s,
        "garbled_rate": args.garbled_rate,
        "callback_delay_ms": args.callback_delay_ms,
        "callback_attempts": args.callback_attempts,
        "callback_retry_delay_ms": args.callback_retry_delay_ms,
        "seed": args.seed,
    }


def callback_urls_from_settings(settings: Settings) -> dict[str, str]:
    """Each dashboard-configured account's API key -> the callback URL it would be given."""
    return {
        provider.api_key.get_secret_value(): callback_url(settings, account)
        for account, provider in settings.providers.items()
        if provider.kind in DASHBOARD_CALLBACK_KINDS
    }


def callback_urls_from_args(values: list[str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for value in values:
        key, sep, url = value.partition("=")
        if not sep or not key or not url:
            raise OptionsError(f"--callback-url expects KEY=URL, got {value!r}")
        urls[key] = url
    return urls


def cli(args: argparse.Namespace) -> int:
    configure_logging("simulator-providers")
    config_path = configured_path(getattr(args, "config", None))
    urls: dict[str, str] = {}
    try:
        settings = load_settings(config_path)  # without a file: the environment's
    except ConfigError as exc:
        log.error("cannot derive callback URLs from the configuration: %s", exc)
        return 2
    if config_path:
        # A line per send is too many under a benchmark's load: the configured level decides.
        configure_logging("simulator-providers", settings.log_level)
        urls.update(callback_urls_from_settings(settings))
    try:
        urls.update(callback_urls_from_args(args.callback_url))
        host, port = split_listen(args.listen)
        simulator = ProviderSimulator(host, port, urls, **options_from_args(args))
    except (OptionsError, ValueError) as exc:
        log.error("invalid simulator option: %s", exc)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        run(serve_until_signalled(simulator), settings.event_loop)
    return 0
