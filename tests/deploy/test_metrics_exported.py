"""Every metric a dashboard panel or an alert rule queries is exported by a running service.

The five services and the campaigns service start in-process against the embedded broker and
serve their ops endpoints; each ``/metrics`` is scraped over HTTP and the names found are compared
with the names the queries select (a counter ``x`` is exposed as ``x_total``, a histogram as
``x_bucket``, ``x_count`` and ``x_sum``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.callbacks.app import build as build_callbacks
from services.campaigns.app import build as build_campaigns
from services.ingress.app import build as build_ingress
from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from shared.config import Settings
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.service import OpsServer, Service
from tests.deploy.promql import dashboard_expressions, metric_names, rule_expressions
from tests.support import make_settings, running

pytestmark = pytest.mark.integration

# Queried, but exported by something other than our services.
EXTERNAL_METRICS = {
    "kafka_consumergroup_lag": "kafka-exporter (broker-side lag per consumer group)",
    "kafka_consumergroup_lag_sum": "kafka-exporter (the same, per topic)",
    "kafka_consumergroup_current_offset": "kafka-exporter (committed offset per partition)",
    "kafka_consumergroup_current_offset_sum": "kafka-exporter (the same, per topic)",
    "kafka_consumergroup_members": "kafka-exporter (members per consumer group)",
    "up": "Prometheus itself (scrape health)",
}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("_info",),
}


def exposed_names(exposition: str) -> set[str]:
    """Every series name a scrape of ``exposition`` can yield, samples or not yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@contextlib.asynccontextmanager
async def ops_server(service: Service, listen: str) -> AsyncIterator[None]:
    """The ops endpoints ``run_service`` serves beside a consumer service."""
    server = OpsServer(listen, service.ready)
    await server.start()
    try:
        yield
    finally:
        await server.stop()


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, url
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


def metrics_urls(settings: Settings) -> dict[str, str]:
    return {
        "ingress": f"http://{settings.ingress.ops_listen}/metrics",
        "callbacks": f"http://{settings.callbacks.ops_listen}/metrics",
        "sender": f"http://{settings.sender.metrics_listen}/metrics",
        "normalizer": f"http://{settings.normalizer.metrics_listen}/metrics",
        "reporter": f"http://{settings.reporter.metrics_listen}/metrics",
        "campaigns": f"http://{settings.campaigns.listen}/metrics",
    }


async def test_every_queried_metric_is_exported_by_a_running_service(
    kafka: EmbeddedBroker,
) -> None:
    settings = make_settings()
    sender, normalizer, reporter = (
        build_sender(settings),
        build_normalizer(settings),
        build_reporter(settings),
    )
    exported: dict[str, set[str]] = {}
    async with (
        running(build_ingress(settings)),
        running(build_callbacks(settings)),
        running(sender),
        running(normalizer),
        running(reporter),
        running(build_campaigns(settings)),
        ops_server(sender, settings.sender.metrics_listen),
        ops_server(normalizer, settings.normalizer.metrics_listen),
        ops_server(reporter, settings.reporter.metrics_listen),
    ):
        for service, url in metrics_urls(settings).items():
            exported[service] = exposed_names(await scrape(url))
    available = set().union(*exported.values())

    queried: dict[str, set[str]] = {}
    for where, expr in [
        *(("alert " + name, expr) for name, expr in rule_expressions()),
        *(("panel " + title, expr) for title, expr in dashboard_expressions()),
    ]:
        for name in metric_names(expr):
            queried.setdefault(name, set()).add(where)
    assert queried, "no metric found in the rules and dashboards"

    missing = {
        name: sorted(places)
        for name, places in queried.items()
        if name not in available and name not in EXTERNAL_METRICS
    }
    assert not missing, f"queried but exported by no service: {missing}"
    # Our own names follow one convention; external ones are listed explicitly.
    assert all(name.startswith("smsbridge_") or name in EXTERNAL_METRICS for name in queried)
    # The runner's metrics come from each consumer service itself.
    for service in ("sender", "normalizer", "reporter", "campaigns"):
        assert {
            "smsbridge_consumer_lag_messages",
            "smsbridge_consumer_lag_seconds",
            "smsbridge_records_processed_total",
            "smsbridge_last_record_processed_timestamp_seconds",
        } <= exported[service], service


def test_name_extraction_handles_the_shapes_used() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (provider, le) (rate(smsbridge_x_bucket{a="b"}'
        "[$__rate_interval]))) / on (tenant) group_left sum without (le) "
        "(increase(smsbridge_y_total[5m])) > 0.5 unless up == 0"
    )
    assert metric_names(expr) == {"smsbridge_x_bucket", "smsbridge_y_total", "up"}
