"""Kafka clients, configured in one place so Tansu and Apache Kafka differ only in settings."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    SaslAuthenticationFailed,
    UnknownProducerId,
    UnsupportedSaslMechanismError,
)

from shared.config import EMBEDDED_BROKER, KafkaSettings
from shared.contract.events import Event
from shared.contract.topics import Topic, use_prefix
from shared.kafka.batches import Pair, PartitionBatches
from shared.kafka.security import security_kwargs

log = logging.getLogger(__name__)

EMBEDDED_BOOTSTRAP_ENV = "SMSBRIDGE_EMBEDDED_BOOTSTRAP"
# How long a stopping producer may try to deliver what it still holds.
PRODUCER_CLOSE_TIMEOUT_S = 5.0
# Which embedded broker runs ("kafka" or "tansu"): exported by shared.kafka.broker when it
# starts one.
EMBEDDED_KIND_ENV = "SMSBRIDGE_EMBEDDED_BROKER"


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time; the caller must not claim the data is stored."""


def bootstrap(settings: KafkaSettings) -> str:
    if settings.bootstrap_servers == EMBEDDED_BROKER:
        # The tests start brokers on free ports and export the address; `smsbridge dev` uses
        # the configured port so that commands in other shells reach it.
        return os.environ.get(EMBEDDED_BOOTSTRAP_ENV, f"127.0.0.1:{settings.embedded_port}")
    return settings.bootstrap_servers


def is_tansu(settings: KafkaSettings) -> bool:
    """Whether we talk to the Tansu fallback: its workarounds apply on this path only."""
    if settings.broker_kind is not None:
        return settings.broker_kind == "tansu"
    return (
        settings.bootstrap_servers == EMBEDDED_BROKER
        and os.environ.get(EMBEDDED_KIND_ENV, "").strip().lower() == "tansu"
    )


def idempotent(settings: KafkaSettings) -> bool:
    if settings.enable_idempotence is not None:
        return settings.enable_idempotence
    return not is_tansu(settings)  # Tansu lacks InitProducerId


def client_id(settings: KafkaSettings, role: str) -> str:
    return f"{settings.client_id_prefix}-{role}-{socket.gethostname()}-{os.getpid()}"


def connection_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Where Kafka is and how to log in to it: what every aiokafka client we build, producer,
    consumer, admin or bare client, is given."""
    return {"bootstrap_servers": bootstrap(settings), **security_kwargs(settings)}


async def connection_problem(settings: KafkaSettings) -> str | None:
    """Why Kafka refuses us, in one line, when it is a login or TLS problem; None otherwise.

    aiokafka reports any failed start as "Unable to bootstrap": one connection of our own tells
    a wrong password or certificate from a broker that is down.
    """
    if settings.security_protocol == "PLAINTEXT":
        return None  # no login, no certificate
    kwargs = connection_kwargs(settings)
    servers = kwargs.pop("bootstrap_servers")
    host, _, port = servers.split(",")[0].strip().rpartition(":")
    where = f"Kafka at {host}:{port}"
    try:
        conn = await create_conn(
            host,
            int(port),
            client_id=client_id(settings, "probe"),
            request_timeout_ms=settings.request_timeout_ms,
            **kwargs,
        )
    except SaslAuthenticationFailed:
        return (
            f"{where} refused the login of {settings.sasl_username!r} "
            f"({settings.sasl_mechanism}): check [kafka] sasl_username and sasl_password"
        )
    except UnsupportedSaslMechanismError as exc:
        return f"{where} does not accept [kafka] sasl_mechanism {settings.sasl_mechanism}: {exc}"
    except ssl.SSLCertVerificationError as exc:
        return (
            f"{where}: its TLS certificate failed verification ({exc.verify_message}): "
            "check [kafka] ssl_cafile and ssl_check_hostname"
        )
    except ssl.SSLError as exc:
        return f"{where}: TLS failed ({exc.reason}): check [kafka] security_protocol and ssl_*"
    except (OSError, KafkaError, TimeoutError, ValueError):
        return None
    conn.close()
    return None


def make_producer(settings: KafkaSettings, role: str) -> AIOKafkaProducer:
    use_prefix(settings.topic_prefix)
    return AIOKafkaProducer(
        **connection_kwargs(settings),
        client_id=client_id(settings, role),
        acks="all",
        enable_idempotence=idempotent(settings),
        linger_ms=settings.linger_ms,
        request_timeout_ms=settings.request_timeout_ms,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
    )


async def stop_producer(
    producer: AIOKafkaProducer, what: str, timeout_s: float = PRODUCER_CLOSE_TIMEOUT_S
) -> None:
    """Flush and close within ``timeout_s``, then close without what Kafka never acknowledged.

    Dropping it is safe: nobody was told it was stored. Without the bound, a producer whose broker
    is gone retries for ever (the idempotent one waits for a producer id) and the stop hangs.
    """
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
    if not done:
        log.warning("%s: Kafka took not all in %gs; closing without the rest", what, timeout_s)
        task = _sender_task(producer)
        if task is not None:
            task.cancel()  # aiokafka has no public "close now"
    await stopping


def make_consumer(
    settings: KafkaSettings,
    group_id: str | None,
    *,
    role: str,
    max_poll_records: int = 500,
    session_timeout_ms: int = 10_000,
    heartbeat_interval_ms: int = 3_000,
) -> AIOKafkaConsumer:
    """``group_id`` as the services name it; ``[kafka] group_prefix`` is added here."""
    use_prefix(settings.topic_prefix)
    return AIOKafkaConsumer(
        **connection_kwargs(settings),
        client_id=client_id(settings, role),
        group_id=group_name(settings, group_id) if group_id else None,
        # Static membership ([kafka] group_instance_id); a consumer without a group has none.
        group_instance_id=settings.group_instance_id if group_id else None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_uncommitted",
        max_poll_records=max_poll_records,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        request_timeout_ms=max(settings.request_timeout_ms, session_timeout_ms + 5_000),
        # Range keeps partition N of co-partitioned topics on the same member (the joins).
        partition_assignment_strategy=(RangePartitionAssignor,),
    )


def group_name(settings: KafkaSettings, group_id: str) -> str:
    """The consumer group's name on the broker."""
    return settings.group_prefix + group_id


def make_admin(settings: KafkaSettings) -> AIOKafkaAdminClient:
    use_prefix(settings.topic_prefix)
    return AIOKafkaAdminClient(
        **connection_kwargs(settings),
        client_id=client_id(settings, "admin"),
        request_timeout_ms=settings.request_timeout_ms,
    )


@dataclass(frozen=True)
class OutRecord:
    topic: Topic
    key: str
    # None is a tombstone (null value): deletes the key from a compacted topic.
    value: Event | None
    # None lets the partitioner pick from the key; changelogs name the input's partition.
    partition: int | None = None

    # Encoded once: ``Outbox`` encodes in its caller (a record that cannot be encoded fails that
    # caller alone, not everybody's flush), the publisher then sends the same bytes.
    @cached_property
    def encoded(self) -> tuple[bytes, bytes | None]:
        value = self.value.to_bytes() if self.value is not None else None
        return self.key.encode("utf-8"), value

    @classmethod
    def with_bytes(
        cls, topic: Topic, key: str, value: Event, value_bytes: bytes, partition: int | None = None
    ) -> OutRecord:
        """A record whose value the caller has encoded already, as ``value.to_bytes()`` would
        (the stores encode each state once, for the local file and the changelog alike)."""
        record = cls(topic, key, value, partition)
        record.__dict__["encoded"] = (key.encode("utf-8"), value_bytes)  # cached_property's slot
        return record


# A broker's answer meaning the producer's idempotence state is beyond repair: a sequence gap,
# left by a batch that expired after it had been sent once (as in a broker outage), or a producer
# id the broker no longer knows. The Java client bumps the producer epoch there (KIP-360);
# aiokafka fails every later batch of that partition with the same error.
BROKEN_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


def producer_broken(producer: AIOKafkaProducer, error: BaseException | None = None) -> bool:
    """Whether ``producer`` will never deliver again: ``error`` says so, or its sender task (which
    some of those errors end) is gone."""
    if isinstance(error, BROKEN_PRODUCER_ERRORS):
        return True
    task = _sender_task(producer)  # aiokafka exposes no "alive"
    return task is not None and task.done()


def _sender_task(producer: AIOKafkaProducer) -> asyncio.Task[None] | None:
    """aiokafka's background task that delivers the producer's batches (a private field)."""
    return getattr(getattr(producer, "_sender", None), "sender_task", None)


# A publish this large is handed over at once; a smaller one lingers for others.
BATCHED_FROM = 64


class Publisher:
    """Publishes events and waits until Kafka (acks=all) holds every one of them.

    Made with ``for_service``, it owns its producer (``start``, ``stop``) and replaces it with a
    new one (a new producer id, sequences from zero) when it is broken (``producer_broken``).
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        timeout_s: float,
        remake: Callable[[], AIOKafkaProducer] | None = None,
        linger_s: float = 0.005,
    ) -> None:
        self.producer = producer
        self.timeout_s = timeout_s
        self._remake = remake
        self._renewing = asyncio.Lock()
        self._retired: set[asyncio.Task[None]] = set()
        self._batches = PartitionBatches(
            lambda: self.producer, linger_s=linger_s, give_up_s=timeout_s
        )

    @classmethod
    def for_service(cls, settings: KafkaSettings, role: str) -> Publisher:
        make = functools.partial(make_producer, settings, role)
        timeout_s, linger_s = settings.produce_timeout_s, settings.linger_ms / 1000
        return cls(make(), timeout_s, remake=make, linger_s=linger_s)

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self, what: str, timeout_s: float = PRODUCER_CLOSE_TIMEOUT_S) -> None:
        await stop_producer(self.producer, what, timeout_s)
        for task in list(self._retired):
            task.cancel()

    async def renew_if_broken(self, failed: AIOKafkaProducer, error: BaseException) -> None:
        """Swap ``failed`` (the producer a send failed on) for a started new one when it is
        broken; the caller's retry then goes through. Concurrent failures swap it once."""
        if self._remake is None or not producer_broken(failed, error):
            return
        async with self._renewing:
            if self.producer is not failed:
                return  # another caller has swapped it already
            fresh = self._remake()
            await fresh.start()
            self.producer = fresh
        log.warning(
            "Kafka producer broken (%s: %s); replaced by a new one", type(error).__name__, error
        )
        retiring = asyncio.create_task(stop_producer(failed, "broken producer", 1.0))
        self._retired.add(retiring)
        retiring.add_done_callback(self._retired.discard)

    async def publish(self, records: Iterable[OutRecord]) -> None:
        groups: dict[tuple[str, int | None], list[Pair]] = {}
        for record in records:
            group = (record.topic.name, record.partition)
            pairs = groups.get(group)
            if pairs is None:
                pairs = groups[group] = []
            pairs.append(record.encoded)
        await self.publish_batches(
            [(topic, partition, pairs) for (topic, partition), pairs in groups.items()]
        )

    async def publish_raw(self, topic: str, pairs: Sequence[Pair]) -> None:
        """Records already encoded (callbacks encodes first, to refuse what cannot be stored)."""
        await self.publish_batches([(topic, None, pairs)])

    async def publish_batches(
        self, groups: Sequence[tuple[str, int | None, Sequence[Pair]]]
    ) -> None:
        """Publish each (topic, partition or None for the keys', records); raise
        ``KafkaUnavailable`` unless Kafka acknowledged every record within the timeout.

        Records are appended to the partitions' open batches (``shared/kafka/batches.py``). A
        publish of ``BATCHED_FROM`` records or more is handed over at once; a smaller one waits
        ``linger_ms`` for others, so that one produce request carries many small publishes.

        After a failure some records may still reach Kafka: callers retry, and consumers know
        repeats by their deterministic ids. A caller that gives up cancels nothing: its records
        may share batches with other callers'.
        """
        waits: set[asyncio.Future[Any]] = set()
        producer = self.producer
        try:
            async with asyncio.timeout(self.timeout_s):
                linger = sum(len(pairs) for _, _, pairs in groups) < BATCHED_FROM
                for topic, partition, pairs in groups:
                    await self._batches.append(topic, pairs, waits, partition, linger=linger)
                if waits:
                    await asyncio.wait(waits)
            for delivered in waits:
                delivered.result()
        except (KafkaError, TimeoutError) as exc:
            await self.renew_if_broken(producer, exc)
            raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc
