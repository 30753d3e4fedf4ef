"""Operator commands: topics, the Optimove handshake, the tenants check, and dead letters.

Each command is a plain function that takes what it needs, writes to the streams it is given and
returns the exit code; ``services/cli.py`` only parses arguments.

Dead letters re-driven are remembered on the compacted topic ``sms.dead-letters-redriven``, one
record per dead letter keyed by its partition and offset in ``sms.dead-letters`` (and holding its
time, so that a recreated dead-letter topic is not mistaken for the old one). A redrive publishes
a chunk of records to their topics, waits for Kafka's acknowledgement, then writes the chunk's
markers: a crash in between re-sends at most that chunk on the next redrive (every stage is
idempotent on replay), and never loses one.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource

from services.ingress.app import API_KEY_HEADER, CAMPAIGN_ROUTE
from shared.config import (
    ProviderSettings,
    Settings,
    TenantSettings,
    plain_http_keys,
)
from shared.events import DeadLetter, RedriveMarker, SchemaError, decode
from shared.kafka import KafkaUnavailable, make_admin, make_consumer, make_producer
from shared.logs import mask_number
from shared.optimove import OptimoveContract
from shared.runner import Record
from shared.signing import SIGNATURE_HEADER, sign
from shared.topics import (
    ALL_TOPICS,
    DEAD_LETTERS,
    DEAD_LETTERS_REDRIVEN,
    Topic,
    ensure_topics,
    topic_configs,
)

# -- topics --------------------------------------------------------------------------------------


async def ensure_topics_command(settings: Settings) -> int:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        result = await ensure_topics(admin, settings.kafka.replication_factor)
    finally:
        await admin.close()
    rf = settings.kafka.replication_factor
    print(f"{'topic':34} {'partitions':>10} {'cleanup.policy':>14} {'min.insync.replicas':>19}")
    for topic in ALL_TOPICS:
        configs = topic_configs(topic, rf)
        print(
            f"{topic.name:34} {topic.partitions:>10} {configs['cleanup.policy']:>14} "
            f"{configs['min.insync.replicas']:>19}  {result[topic.name]}"
        )
    return 1 if any(state.startswith("exists with") for state in result.values()) else 0


# -- handshake (Flow 1, decisions.md §8) ---------------------------------------------------------


class EndpointUnreachable(Exception):
    """Our campaign endpoint does not answer as it must at its public URL."""


@dataclass(frozen=True)
class HandshakeAnswer:
    status: int
    body: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


def campaign_send_url(settings: Settings, slug: str) -> str:
    """Where Optimove will post the tenant's campaigns: ingress's route at its public URL."""
    return settings.ingress.public_url.rstrip("/") + CAMPAIGN_ROUTE.format(tenant=slug)


async def check_campaign_endpoint(
    session: aiohttp.ClientSession, settings: Settings, slug: str, timeout_s: float = 10.0
) -> None:
    """Raise EndpointUnreachable unless the tenant's campaign endpoint works at its public URL.

    One request, through whatever proxy stands in front of ingress: the JSON object ``{}`` with
    the tenant's ``X-API-Key``, signed with its secret. Ingress checks the key and the signature
    before its readiness and the body, so its answer says how far the request got:

    - 400 (not a campaign request; nothing is published): our ingress is there, takes this
      tenant's key and signature, and is ready. It counts one ``invalid_schema`` request.
    - 401: the ingress there does not know this tenant with these secrets.
    - 503: it is starting (or Kafka is away); anything else: the URL does not reach our ingress.

    ``/readyz`` cannot tell: it is on ``[ingress] ops_listen``, which the public URL never reaches.
    """
    tenant = settings.tenants[slug]
    url = campaign_send_url(settings, slug)
    body = b"{}"
    headers = {
        "content-type": "application/json",
        API_KEY_HEADER: tenant.aggregator_api_key.get_secret_value(),
        SIGNATURE_HEADER: sign(body, tenant.secret_key.get_secret_value()),
    }
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise EndpointUnreachable(f"{origin(url)} is not reachable: {detail}") from None
    if status == 400:
        return
    if status == 401:
        raise EndpointUnreachable(
            f"{url} answered 401: ingress there does not know {slug} with this "
            "aggregator_api_key and secret_key"
        )
    if status == 503:
        raise EndpointUnreachable(f"{url} answered 503: ingress there is not ready")
    raise EndpointUnreachable(f"{url} answered {status} to a signed test request instead of 400")


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: what an unreachable-host error is about."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def plain_http_refusal(settings: Settings, slug: str) -> str | None:
    """Why the handshake must not register the tenant's URLs over plain HTTP, or None: the
    campaign URL (Optimove posts recipients there) and its Optimove (the handshake carries our
    aggregator_api_key there) must be https:// unless ``allow_plain_http`` says otherwise."""
    if settings.allow_plain_http:
        return None
    plain = plain_http_keys(
        {
            "ingress.public_url": campaign_send_url(settings, slug),
            f"tenants.{slug}.optimove_base_url": settings.tenants[slug].optimove_base_url,
        }
    )
    if not plain:
        return None
    return (
        f"{', '.join(plain)} must be https:// (allow_plain_http = true permits http://, for "
        "development and tests only)"
    )


async def handshake(
    session: aiohttp.ClientSession, settings: Settings, slug: str, timeout_s: float = 10.0
) -> HandshakeAnswer:
    """Post the signed handshake to the tenant's Optimove and return its answer."""
    request = OptimoveContract(settings.optimove).handshake(
        settings.tenants[slug], campaign_send_url(settings, slug)
    )
    async with session.post(
        request.url,
        data=request.body,
        headers=request.headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        allow_redirects=False,
    ) as response:
        return HandshakeAnswer(response.status, await response.text(errors="replace"))


async def handshake_command(
    settings: Settings, slug: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    if slug not in settings.tenants:
        known = ", ".join(sorted(settings.tenants)) or "none"
        print(f"unknown tenant {slug!r} (configured: {known})", file=err)
        return 2
    url = campaign_send_url(settings, slug)
    refusal = plain_http_refusal(settings, slug)
    if refusal is not None:
        print(f"refusing the handshake for {slug}: {refusal}", file=err)
        return 1
    timeout_s = settings.reporter.request_timeout_s
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        try:
            await check_campaign_endpoint(session, settings, slug, timeout_s)
        except EndpointUnreachable as exc:
            print(f"refusing the handshake for {slug}: {exc}", file=err)
            print("Optimove must be able to post campaigns there before the handshake.", file=err)
            return 1
        print(f"campaign endpoint {url} answers; registering it with Optimove", file=out)
        try:
            answer = await handshake(session, settings, slug, timeout_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            print(f"handshake with Optimove failed: {str(exc) or type(exc).__name__}", file=err)
            return 1
    print(f"Optimove answered {answer.status}", file=out)
    print(answer.body, file=out)
    return 0 if answer.accepted else 1


# -- tenants check ---------------------------------------------------------------------------------

_SECRET_KEYS = ("api_token", "secret_key", "aggregator_api_key")


@dataclass(frozen=True)
class Problem:
    key: str  # dotted, relative to its tenant or provider
    message: str  # never a secret's value: pydantic's message, or ours


@dataclass
class ConfigurationCheck:
    general: list[Problem] = field(default_factory=list)
    tenants: dict[str, list[Problem]] = field(default_factory=dict)
    providers: dict[str, list[Problem]] = field(default_factory=dict)
    # Per tenant: the providers its routes name, as written.
    routes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def problems(self) -> int:
        return (
            len(self.general)
            + sum(map(len, self.tenants.values()))
            + sum(map(len, self.providers.values()))
        )


def check_configuration(data: Mapping[str, Any]) -> ConfigurationCheck:
    """Every problem of every tenant and provider, per key, with environment overrides applied.

    ``load_settings`` stops at the first invalid configuration; this validates each tenant and
    provider on its own so that one broken tenant does not hide another's problems.
    """
    check = ConfigurationCheck()
    merged = _merge(dict(data), EnvSettingsSource(Settings)())
    try:
        Settings(**data)
    except ValidationError as exc:
        check.general = [
            Problem(_dotted(error["loc"]), _message(error))
            for error in exc.errors()
            # Tenants and providers are checked one by one below; the root check is the
            # routes', repeated below per tenant.
            if error["loc"] and error["loc"][0] not in ("tenants", "providers")
        ]
    providers: dict[str, Any] = merged.get("providers") or {}
    for name, raw in sorted(providers.items()):
        check.providers[name] = _problems(ProviderSettings, raw)
    tenants: dict[str, Any] = merged.get("tenants") or {}
    if not tenants:
        check.general.append(Problem("tenants", "no tenant is configured"))
    for slug, raw in sorted(tenants.items()):
        problems = _problems(TenantSettings, raw)
        routes = raw.get("routes") if isinstance(raw, dict) else None
        named: list[str] = []
        for index, route in enumerate(routes if isinstance(routes, list) else []):
            provider = route.get("provider") if isinstance(route, dict) else None
            if not isinstance(provider, str):
                continue  # reported by the tenant's own validation
            named.append(provider)
            if provider not in providers:
                known = ", ".join(sorted(providers)) or "none"
                problems.append(
                    Problem(
                        f"routes.{index}.provider",
                        f"unknown provider {provider!r} (known: {known})",
                    )
                )
            elif check.providers[provider]:
                problems.append(
                    Problem(
                        f"routes.{index}.provider",
                        f"provider {provider!r} has problems (see below)",
                    )
                )
        check.tenants[slug] = problems
        check.routes[slug] = named
    return check


def tenants_check_command(data: Mapping[str, Any], out: TextIO = sys.stdout) -> int:
    check = check_configuration(data)
    for slug, problems in check.tenants.items():
        if problems:
            print(f"tenant {slug}: {_count(len(problems), 'problem')}", file=out)
            for problem in problems:
                print(f"  {problem.key}: {problem.message}", file=out)
        else:
            routes = ", ".join(check.routes[slug])
            secrets = ", ".join(_SECRET_KEYS)
            print(f"tenant {slug}: ok ({secrets} resolve; routes: {routes})", file=out)
    for name, problems in check.providers.items():
        print(
            f"provider {name}: {_count(len(problems), 'problem') if problems else 'ok'}", file=out
        )
        for problem in problems:
            print(f"  {problem.key}: {problem.message}", file=out)
    for problem in check.general:
        print(f"configuration {problem.key}: {problem.message}", file=out)
    if check.problems:
        print(f"{_count(check.problems, 'problem')} found", file=out)
        return 1
    print(f"{_count(len(check.tenants), 'tenant')} ready", file=out)
    return 0


def _problems(model: type[BaseModel], raw: object) -> list[Problem]:
    try:
        model.model_validate(raw)
    except ValidationError as exc:
        # ``msg`` only: pydantic keeps the offending input in ``input``, which may be a secret.
        return [
            Problem(_dotted(error["loc"]) or "(all)", _message(error)) for error in exc.errors()
        ]
    return []


def _message(error: Any) -> str:
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def _dotted(loc: Iterable[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _merge(target: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
            target[key] = _merge(dict(target[key]), value)
        else:
            target[key] = value
    return target


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- dead letters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredDeadLetter:
    partition: int
    offset: int
    letter: DeadLetter
    redriven: bool = False

    @property
    def ident(self) -> str:
        """Where it sits in ``sms.dead-letters``: what a redrive remembers it by (the key of
        its ``RedriveMarker``)."""
        return f"{self.partition}:{self.offset}"


# A key segment that is a phone number: optional "+", then 7 to 15 digits.
_NUMBER_SEGMENT = re.compile(r"\+?\d{7,15}")


def mask_key(key: str | None) -> str:
    """A record key fit to print: segments (``:``-separated) that are numbers are masked."""
    if key is None:
        return "-"
    return ":".join(
        mask_number(part) if _NUMBER_SEGMENT.fullmatch(part) else part for part in key.split(":")
    )


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def read_dead_letters(
    settings: Settings,
    *,
    source_topic: str | None = None,
    since: datetime | None = None,
) -> list[StoredDeadLetter]:
    """Every dead letter (oldest first), filtered, each marked when it was re-driven already."""
    markers = await read_redrive_markers(settings)
    found: list[StoredDeadLetter] = []
    for tp, record in await _read_to_end(settings, DEAD_LETTERS):
        try:
            letter = decode(DeadLetter, record.value)
        except SchemaError:
            continue  # not ours to show: something else wrote to the topic
        if source_topic is not None and letter.source_topic != source_topic:
            continue
        if since is not None and letter.at < since:
            continue
        marker = markers.get(f"{tp.partition}:{record.offset}")
        redriven = marker is not None and marker.dead_letter_at == letter.at
        found.append(StoredDeadLetter(tp.partition, record.offset, letter, redriven=redriven))
    found.sort(key=lambda stored: (stored.letter.at, stored.partition, stored.offset))
    return found


async def read_redrive_markers(settings: Settings) -> dict[str, RedriveMarker]:
    markers: dict[str, RedriveMarker] = {}
    for _, record in await _read_to_end(settings, DEAD_LETTERS_REDRIVEN):
        if record.key is None:
            continue
        ident = record.key.decode("utf-8", "replace")
        if record.value is None:
            markers.pop(ident, None)
            continue
        try:
            markers[ident] = decode(RedriveMarker, record.value)
        except SchemaError:
            continue
    return markers


_COLUMNS = (
    "ID",
    "TIME",
    "STAGE",
    "SOURCE TOPIC",
    "REASON",
    "ATTEMPTS",
    "STATUS",
    "KEY",
    "REDRIVEN",
)
_REASON_WIDTH = 60


def dead_letter_rows(letters: Iterable[StoredDeadLetter]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for stored in letters:
        letter = stored.letter
        reason = " ".join(letter.reason.split())
        if len(reason) > _REASON_WIDTH:
            reason = reason[: _REASON_WIDTH - 1] + "…"
        rows.append(
            (
                stored.ident,
                letter.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                letter.stage,
                letter.source_topic,
                reason,
                str(letter.attempts),
                str(letter.status_code) if letter.status_code is not None else "-",
                mask_key(letter.key),
                "yes" if stored.redriven else "-",
            )
        )
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


async def dlq_list_command(
    settings: Settings,
    *,
    source_topic: str | None,
    since: datetime | None,
    limit: int,
    out: TextIO = sys.stdout,
) -> int:
    letters = await read_dead_letters(settings, source_topic=source_topic, since=since)
    shown = list(deque(letters, maxlen=max(0, limit)))
    if not shown:
        print("no dead letters", file=out)
        return 0
    print(format_table(_COLUMNS, dead_letter_rows(shown)), file=out)
    if len(shown) < len(letters):
        print(f"(the newest {len(shown)} of {len(letters)}; see --limit)", file=out)
    return 0


@dataclass(frozen=True)
class RedriveSummary:
    redriven: int
    already_redriven: int
    not_redrivable: int


ProgressCallback = Callable[[int, int], None]


async def redrive(
    settings: Settings,
    *,
    source_topic: str,
    since: datetime | None = None,
    dry_run: bool = False,
    chunk_size: int = 500,
    progress: ProgressCallback | None = None,
) -> RedriveSummary:
    """Send the dead letters of ``source_topic`` back to their ``redrive_topic``, each once.

    The original key and payload are published as they were; dead letters without a redrive
    topic are counted and left alone. ``progress(done, total)`` follows the publishing.
    """
    letters = await read_dead_letters(settings, source_topic=source_topic, since=since)
    pending = [s for s in letters if not s.redriven and s.letter.redrive_topic]
    summary = RedriveSummary(
        redriven=len(pending),
        already_redriven=sum(1 for s in letters if s.redriven),
        not_redrivable=sum(1 for s in letters if not s.redriven and not s.letter.redrive_topic),
    )
    if dry_run or not pending:
        return summary
    producer = make_producer(settings.kafka, "redrive")
    await _start_client(producer)
    try:
        done = 0
        if progress is not None:
            progress(done, len(pending))
        for start in range(0, len(pending), max(1, chunk_size)):
            chunk = pending[start : start + chunk_size]
            await _send_and_wait(
                producer,
                settings.kafka.produce_timeout_s,
                [
                    (
                        s.letter.redrive_topic,
                        s.letter.key.encode("utf-8") if s.letter.key is not None else None,
                        s.letter.payload.encode("utf-8"),
                    )
                    for s in chunk
                ],
            )
            await _send_and_wait(
                producer,
                settings.kafka.produce_timeout_s,
                [
                    (
                        DEAD_LETTERS_REDRIVEN.name,
                        s.ident.encode("utf-8"),
                        RedriveMarker(
                            dead_letter_at=s.letter.at, redrive_topic=s.letter.redrive_topic
                        ).to_bytes(),
                    )
                    for s in chunk
                ],
            )
            done += len(chunk)
            if progress is not None:
                progress(done, len(pending))
    finally:
        await producer.stop()
    return summary


async def dlq_redrive_command(
    settings: Settings,
    *,
    source_topic: str,
    since: datetime | None,
    dry_run: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    bar = ProgressBar(err, label=f"redrive {source_topic}")
    summary = await redrive(
        settings, source_topic=source_topic, since=since, dry_run=dry_run, progress=bar.update
    )
    bar.finish()
    verb = "would re-drive" if dry_run else "re-drove"
    print(
        f"{verb} {summary.redriven}; already re-driven {summary.already_redriven}; "
        f"without a redrive topic {summary.not_redrivable}",
        file=out,
    )
    return 0


class ProgressBar:
    """``label [#####.....] done/total``, redrawn in place on a terminal, in lines otherwise."""

    def __init__(self, stream: TextIO, *, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self._drawn = False
        self._last_line = 0.0

    def update(self, done: int, total: int) -> None:
        filled = self.width if total == 0 else self.width * done // total
        text = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        if self.stream.isatty():
            self.stream.write("\r" + text)
        elif done in (0, total) or time.monotonic() - self._last_line >= 1.0:
            self.stream.write(text + "\n")
            self._last_line = time.monotonic()
        else:
            return
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


async def _start_client(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    try:
        await client.start()
    except KafkaError as exc:
        await client.stop()
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def _send_and_wait(
    producer: AIOKafkaProducer, timeout_s: float, records: Sequence[tuple[str, bytes | None, bytes]]
) -> None:
    futures: list[asyncio.Future[object]] = []
    try:
        for topic, key, value in records:
            futures.append(await producer.send(topic, value, key=key))
        await asyncio.wait_for(asyncio.gather(*futures), max(timeout_s, 1.0) * 3)
    except (KafkaError, TimeoutError) as exc:
        for future in futures:
            future.cancel()
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def _read_to_end(
    settings: Settings, topic: Topic, stall_timeout_s: float = 30.0
) -> list[tuple[TopicPartition, Record]]:
    """Every record of ``topic`` up to its high watermark (no consumer group, nothing committed).

    The end comes from the fetch responses' high watermark: Tansu cannot list the latest offsets.
    """
    consumer = make_consumer(settings.kafka, None, role="admin-read")
    await _start_client(consumer)
    found: list[tuple[TopicPartition, Record]] = []
    try:
        numbers = consumer.partitions_for_topic(topic.name) or set(range(topic.partitions))
        remaining = {TopicPartition(topic.name, p) for p in numbers}
        consumer.assign(sorted(remaining, key=lambda tp: tp.partition))
        await consumer.seek_to_beginning(*remaining)
        last_progress = time.monotonic()
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=200, max_records=10_000)
            for tp, records in batches.items():
                found.extend((tp, record) for record in records)
                last_progress = time.monotonic()
            for tp in list(remaining):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    remaining.discard(tp)
            if time.monotonic() - last_progress > stall_timeout_s:
                raise KafkaUnavailable(f"{topic.name}: no progress reading for {stall_timeout_s}s")
    except KafkaError as exc:
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc
    finally:
        await consumer.stop()
    return found
