"""Configuration: one TOML file, overridable by environment variables, validated at start.

Precedence (highest first): environment (``SMSBRIDGE_<SECTION>__<KEY>``), the TOML file, defaults.
The file is ``--config PATH`` or ``$SMSBRIDGE_CONFIG``.

Secrets are written inline, as ``env:NAME`` or as ``file:/path``, or as a current value with
previous ones for a rotation (``shared/secrets.py``). They are resolved at load time, so that a
missing variable or file fails start-up with the key that names it, and no secret is ever printed
by ``repr`` or a log line.
"""

from __future__ import annotations

import os
import tomllib
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.contract.keywords import (
    DEFAULT_OPT_IN_KEYWORDS,
    DEFAULT_OPT_OUT_KEYWORDS,
    overlapping_keywords,
)
from shared.contract.statuses import SubStatus
from shared.secrets import Secret, resolve_secret

CONFIG_ENV_VAR = "SMSBRIDGE_CONFIG"
# The delivery report's extra fields (decisions.md §4), each a guess: [optimove] report_fields
# renames or drops them (shared/contract/optimove.py writes them).
DELIVERY_REPORT_FIELDS = (
    "batchId",
    "requestId",
    "customerId",
    "mobileNumber",
    "messageId",
    "providerMessageId",
    "timestamp",
)
EMBEDDED_BROKER = "embedded"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    return value


ListenAddress = Annotated[str, AfterValidator(_host_port)]
ProviderKind = Literal["otpiq", "opensms", "octopush"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
# Octopush wants its callbacks answered in under a second (providers.md §3); others are not known.
DEFAULT_CALLBACK_DEADLINES_S: dict[ProviderKind, float] = {"octopush": 0.8}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {value!r} (one of {', '.join(LOG_LEVELS)})")
    return level


LogLevel = Annotated[str, AfterValidator(_log_level)]


def _from_reference(value: str | None) -> str | None:
    """A plain setting that may be ``env:NAME`` (a pod's name from the downward API)."""
    if value is None:
        return None
    resolved = resolve_secret(value).strip()
    if not resolved:
        raise ValueError("is empty")
    return resolved


OptionalReference = Annotated[str | None, AfterValidator(_from_reference)]


def split_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    bootstrap_servers: str = EMBEDDED_BROKER
    # Where `smsbridge dev` starts the embedded broker, so commands in other shells find it.
    embedded_port: int = 19092
    # Where `smsbridge dev` keeps Apache Kafka's data, so a restarted stack keeps its topics.
    embedded_data_dir: str = ".smsbridge/kafka"
    # Which broker answers: None is Apache Kafka, or for "embedded" the one shared.kafka.broker
    # started.
    # "tansu" turns on the fallback broker's workarounds (shared.kafka.clients.is_tansu).
    broker_kind: Literal["kafka", "tansu"] | None = None
    # None: on, except against the Tansu fallback, which lacks InitProducerId.
    enable_idempotence: bool | None = None
    client_id_prefix: str = "smsbridge"
    # Several environments on one cluster: every topic and consumer group name gets its prefix.
    topic_prefix: str = ""
    group_prefix: str = ""
    # Static membership (KIP-345): this process's group.instance.id in its consumer group, unique
    # per group (in Kubernetes "env:POD_NAME"). A member restarted under the same id within
    # runner.session_timeout_ms gets its partitions back without a rebalance; a static member
    # never leaves on stop, so its partitions wait that long when it does not come back.
    # Unset: dynamic membership.
    group_instance_id: OptionalReference = None
    replication_factor: int = 1
    request_timeout_ms: int = 10_000
    # How long a producer waits for acks=all before ingress answers 503.
    produce_timeout_s: float = 5.0
    linger_ms: int = 5
    # Managed Kafka (Confluent Cloud, MSK, Aiven) wants TLS and SASL; every client, the CLI and
    # the Kafka tools passthrough use these (shared.kafka.security).
    security_protocol: SecurityProtocol = "PLAINTEXT"
    # OAUTHBEARER is refused: aiokafka leaves fetching tokens to a provider we do not have.
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    # PEM files; without ssl_cafile the system's CAs verify the broker.
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: Secret | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _security_complete(self) -> KafkaSettings:
        problem = kafka_security_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self


def kafka_security_problem(kafka: KafkaSettings) -> str | None:
    """What makes the TLS/SASL settings unusable, or None: a half-configured login would only
    show as an opaque connection failure later."""
    protocol = kafka.security_protocol
    sasl = {"sasl_mechanism": kafka.sasl_mechanism, "sasl_username": kafka.sasl_username}
    sasl["sasl_password"] = "set" if kafka.sasl_password is not None else None
    if protocol.startswith("SASL_"):
        missing = [key for key, value in sasl.items() if not value]
        if missing:
            return f"security_protocol {protocol} needs {', '.join(missing)}"
        if kafka.sasl_mechanism == "OAUTHBEARER":
            return (
                "sasl_mechanism OAUTHBEARER is not supported (aiokafka needs a token provider "
                "sms-bridge does not have): use SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN"
            )
    elif any(sasl.values()):
        named = ", ".join(key for key, value in sasl.items() if value)
        return f"{named} set, but security_protocol {protocol} uses no SASL"
    files = {
        "ssl_cafile": kafka.ssl_cafile,
        "ssl_certfile": kafka.ssl_certfile,
        "ssl_keyfile": kafka.ssl_keyfile,
    }
    if not protocol.endswith("SSL"):
        given = [key for key, value in files.items() if value]
        if kafka.ssl_key_password is not None:
            given.append("ssl_key_password")
        if given:
            return f"{', '.join(given)} set, but security_protocol {protocol} uses no TLS"
        return None
    if kafka.ssl_keyfile and not kafka.ssl_certfile:
        return "ssl_keyfile needs ssl_certfile (the client certificate)"
    for key, path in files.items():
        if path and not Path(path).is_file():
            return f"{key}: no such file {path}"
    return None


class RunnerSettings(Section):
    """Knobs of the shared poll/process/commit loop, per consumer service."""

    max_poll_records: int = 500
    max_in_flight: int = 1000
    commit_interval_s: float = 1.0
    # A record counts against max_in_flight until its offset is committed, not only until it is
    # handled: a crash then repeats at most max_in_flight records' work. At most max_in_flight
    # records finish per commit.
    hold_slots_until_committed: bool = False
    shutdown_deadline_s: float = 20.0
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000


class HttpServiceSettings(Section):
    """A service the internet calls: ``listen`` serves only that; ``/metrics``, ``/healthz`` and
    ``/readyz`` answer on ``ops_listen``, an address that need not be published."""

    listen: ListenAddress
    ops_listen: ListenAddress

    @model_validator(mode="after")
    def _ops_apart_from_listen(self) -> HttpServiceSettings:
        if split_listen(self.ops_listen)[1] == split_listen(self.listen)[1]:
            raise ValueError(f"ops_listen must use another port than listen ({self.listen})")
        return self


class IngressSettings(HttpServiceSettings):
    listen: ListenAddress = "127.0.0.1:8080"
    ops_listen: ListenAddress = "127.0.0.1:9100"
    public_url: str = "http://127.0.0.1:8080"
    max_body_bytes: int = 32 * 1024 * 1024
    # Bytes of campaign bodies being read and handled at once, over all requests (a body without
    # Content-Length counts as max_body_bytes); beyond it the answer is 503 with Retry-After.
    max_reading_bytes: int = 128 * 1024 * 1024
    max_recipients: int = 100_000
    # How long an accepted request is remembered, so that a retry publishes nothing new.
    ledger_retention_s: float = 7 * 24 * 3600.0
    # Requests without batchId and requestId (auto replies) are known by their content; the same
    # content again within this long of its first acceptance is a retry (Optimove's retry
    # horizon), later it is a new message to send.
    idless_dedupe_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _a_whole_body_can_be_read(self) -> IngressSettings:
        if self.max_reading_bytes < self.max_body_bytes:
            raise ValueError("max_reading_bytes must be at least max_body_bytes")
        return self


class CallbacksSettings(HttpServiceSettings):
    listen: ListenAddress = "127.0.0.1:8081"
    ops_listen: ListenAddress = "127.0.0.1:9101"
    public_url: str = "http://127.0.0.1:8081"
    max_body_bytes: int = 64 * 1024
    # A provider waits only so long for our answer (Octopush: under 1 s, providers.md §3). Past
    # the deadline the answer is 503, so that the provider retries (the retry's events have the
    # same ids; the normalizer drops the duplicate). Per provider kind, else deadline_s; an
    # account's callback_deadline_s wins over both.
    deadline_s: float = Field(default=5.0, gt=0)
    deadline_by_kind_s: dict[ProviderKind, Annotated[float, Field(gt=0)]] = dict(
        DEFAULT_CALLBACK_DEADLINES_S
    )

    @field_validator("deadline_by_kind_s", mode="before")
    @classmethod
    def _partial_deadlines_keep_the_others(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {**DEFAULT_CALLBACK_DEADLINES_S, **value}
        return value


class ConsumerServiceSettings(Section):
    """A consumer service's section: its ``runner`` defaults are the service's own."""

    runner: RunnerSettings = RunnerSettings()
    # The consumer group; empty = smsbridge-<service>. [kafka] group_prefix is added to either.
    # A new one reads its inputs from the beginning and leaves the old group's offsets as they
    # were (docs/replay.md).
    group_id: str = ""

    @field_validator("runner", mode="before")
    @classmethod
    def _partial_runner_keeps_service_defaults(cls, value: Any) -> Any:
        # [normalizer.runner] shutdown_deadline_s = 5 must not reset max_in_flight to the
        # generic default: a partial table is merged over this service's defaults.
        if isinstance(value, dict):
            defaults = cls.model_fields["runner"].default
            return {**defaults.model_dump(), **value}
        return value


class SenderSettings(ConsumerServiceSettings):
    metrics_listen: ListenAddress = "127.0.0.1:9102"
    request_timeout_s: float = 10.0
    max_attempts_per_route: int = Field(default=3, ge=1)
    # Waits between attempts on one route: full jitter over base * 2^n, capped (Retry-After wins
    # when longer). A waiting message is parked in sms.sender-state; nothing is held meanwhile.
    retry_base_delay_s: float = Field(default=1.0, gt=0)
    retry_max_delay_s: float = Field(default=300.0, gt=0)
    # How often parked messages (scheduled, retrying, waiting for a circuit) are looked at.
    timer_interval_s: float = Field(default=0.2, gt=0)
    # Bulk providers: how long due messages with the same account, text and sender are gathered
    # into one call (never more than the provider's max_batch).
    batch_window_s: float = Field(default=0.02, ge=0)
    # How long a message's outcome is remembered after its validity ended, so that a replay of
    # sms.recipients sends nothing twice (a replayed message older than validity is expired).
    keep_outcome_s: float = Field(default=24 * 3600.0, ge=0)
    # An auto reply (optimove-sms-api.md §3.4) to an opted-out customer goes out when the
    # customer wrote to the tenant at most this long before Optimove handed it to us (a STOP's
    # confirmation). Longer than the reporter's give_up_after_s (24 h), for which a reply may
    # wait to reach Optimove before Optimove can answer it; campaigns are never let through.
    reply_window_s: float = Field(default=48 * 3600.0, gt=0)
    # Fair share: how much bulk work each account keeps waiting in memory, in seconds of its rate
    # limit. Beyond it a campaign's further messages are parked, so that the messages behind
    # them on the partitions (another campaign, an auto reply) are read and take their turn.
    fair_queue_s: float = Field(default=0.5, gt=0)
    # How many records may wait in the log, by offset, for their campaign's turn (per instance):
    # beyond it the sender reads no further until some were sent. Each costs 8 bytes; a lower
    # bound reaches a campaign behind a longer backlog later (docs/sending.md, "Reading ahead").
    read_ahead_records: int = Field(default=1_000_000, ge=1)
    state_dir: str = ""  # empty = a private temporary directory per process


class NormalizerSettings(ConsumerServiceSettings):
    metrics_listen: ListenAddress = "127.0.0.1:9103"
    # Records of one correlation key run in order (runner key chains + the store's key locks).
    runner: RunnerSettings = RunnerSettings(max_in_flight=500)
    state_dir: str = ""  # empty = a private temporary directory per process
    unmatched_after_s: float = 600.0
    dlr_timeout_s: float = 72 * 3600.0
    # How long a finished message is remembered, so that late or repeated reports are dropped.
    keep_finished_s: float = 24 * 3600.0
    # Providers whose send answer names no message (OpenSMS): a report goes to the latest message
    # sent to its number on its account at most this long before it (number_match.py), and at
    # most this many messages per number and account are remembered for it.
    match_by_number_window_s: float = Field(default=24 * 3600.0, gt=0)
    match_by_number_max_messages: int = Field(default=32, ge=1)
    # How long a reply's provider event id is remembered, so that a repeated callback is
    # forwarded once.
    inbound_dedupe_s: float = 24 * 3600.0
    # How often the number directory (how Optimove wrote each number) is re-stamped for a number
    # sent to again; the stamp decides between tenants sharing a provider account.
    number_format_refresh_s: float = 24 * 3600.0
    # Replies that are exactly one of these words (trimmed, any case) opt out / opt back in
    # (decisions.md §6, ``shared/contract/keywords.py``).
    opt_out_keywords: list[str] = list(DEFAULT_OPT_OUT_KEYWORDS)
    opt_in_keywords: list[str] = list(DEFAULT_OPT_IN_KEYWORDS)

    @model_validator(mode="after")
    def _keywords_do_not_overlap(self) -> NormalizerSettings:
        both = overlapping_keywords(self.opt_out_keywords, self.opt_in_keywords)
        if both:
            raise ValueError(f"opt_in_keywords repeat opt_out_keywords: {sorted(both)}")
        return self


class ReporterSettings(ConsumerServiceSettings):
    metrics_listen: ListenAddress = "127.0.0.1:9104"
    # Every report finished but not committed is sent again after a crash: the reporter commits
    # often and counts uncommitted reports against max_in_flight.
    runner: RunnerSettings = RunnerSettings(
        max_in_flight=200, commit_interval_s=0.05, hold_slots_until_committed=True
    )
    request_timeout_s: float = 10.0
    give_up_after_s: float = 24 * 3600.0
    max_backoff_s: float = 300.0
    inbound_batch_size: int = 100
    inbound_batch_delay_s: float = 0.5
    # How long a report is retried in memory before it is parked in sms.reporter-state.
    inline_retry_s: float = 3.0
    # Consecutive failed requests after which a tenant's Optimove is probed one request at a
    # time while its new reports park directly (a 429 or a Retry-After opens it at once).
    circuit_failure_threshold: int = Field(default=3, ge=1)
    # How often parked reports are looked at, and how many retries of them run at once.
    parked_poll_interval_s: float = 0.5
    parked_max_in_flight: int = Field(default=100, ge=1)
    # How long what Optimove acknowledged is remembered (in sms.reporter-state), so that a replay
    # of sms.statuses or sms.inbound posts nothing twice; a replay reaching further back than
    # this posts those reports again. 0 remembers nothing.
    remember_acknowledged_s: float = Field(default=48 * 3600.0, ge=0)
    state_dir: str = ""  # empty = a private temporary directory per process


class CampaignsSettings(ConsumerServiceSettings):
    """The campaigns service: live counts per campaign, and the admin API (pause, resume,
    cancel) on ``listen`` beside /metrics, /healthz and /readyz."""

    listen: ListenAddress = "127.0.0.1:8085"
    # Bearer token of the admin API; without one every admin call is 401.
    admin_token: Secret | None = None
    # A campaign with no activity (no record of it read) for this long is forgotten: its
    # counters are deleted from sms.campaign-counts, so that the state stays bounded.
    expire_after_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    # How long changed counters are gathered before they are written in one batch; every input
    # offset waits for the write that covers it before it may be committed. At 5 ms a live
    # campaign wrote about one counters record per input (docs/performance.md).
    flush_linger_s: float = Field(default=0.1, ge=0)


class OptimoveContractSettings(Section):
    """Every guess at an undocumented Optimove field; see ``shared/contract/optimove.py``."""

    api_version: str = "v1"
    handshake_path: str = "/api/{version}/aggregator/handshake"
    delivery_report_path: str = "/api/{version}/aggregator/delivery-report"
    incoming_message_path: str = "/api/{version}/aggregator/incoming-message"
    handshake_url_field: str = "campaignSendUrl"
    handshake_api_key_field: str = "apiKey"
    handshake_sender_id_field: str = "senderId"
    # canonical status -> Optimove type.status (decisions.md §4)
    status_names: dict[str, str] = {
        "sent": "Sent",
        "delivered": "Delivered",
        "failed": "Failed",
    }
    # Our sub-status (shared/contract/statuses.py) -> Optimove type.subStatus; one not listed goes
    # as is.
    sub_status_names: dict[str, str] = {}
    # The delivery report's undocumented extra fields -> the name Optimove gets; "" leaves the
    # field out. Fields not listed keep their name: if Optimove refuses one (400), this fixes it.
    report_fields: dict[str, str] = {name: name for name in DELIVERY_REPORT_FIELDS}

    @field_validator("report_fields", mode="before")
    @classmethod
    def _partial_report_fields_keep_the_others(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {**{name: name for name in DELIVERY_REPORT_FIELDS}, **value}
        return value

    @field_validator("report_fields")
    @classmethod
    def _known_report_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(DELIVERY_REPORT_FIELDS))
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {list(DELIVERY_REPORT_FIELDS)}")
        names = [name for name in value.values() if name]
        taken = {"type", "metadata"}.intersection(names)
        if taken or len(set(names)) != len(names):
            raise ValueError("two fields share one name, or a field is named type or metadata")
        return value

    @field_validator("sub_status_names")
    @classmethod
    def _known_sub_statuses(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {str(sub) for sub in SubStatus})
        if unknown:
            raise ValueError(
                f"unknown sub-statuses {unknown}; known: {[str(s) for s in SubStatus]}"
            )
        if not all(value.values()):
            raise ValueError("a sub-status name must not be empty")
        return value


class Route(Section):
    provider: str
    # Destination prefixes (E.164 digits, no '+') this route serves; empty = every destination.
    prefixes: list[str] = []
    priority: int = 100


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _hours_range(value: str) -> str:
    start, sep, end = value.partition("-")
    try:
        if not sep:
            raise ValueError
        first, last = _minutes(start), _minutes(end)
    except ValueError:
        raise ValueError(f"{value!r}: write hours as HH:MM-HH:MM (24:00 for midnight)") from None
    if first >= last:
        raise ValueError(f"{value!r}: the end must come after the start, on the same day")
    return value


def _minutes(value: str) -> int:
    hours, sep, minutes = value.strip().partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit():
        raise ValueError
    total = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or total > 24 * 60:
        raise ValueError
    return total


HoursRange = Annotated[str, AfterValidator(_hours_range)]


class SendWindow(Section):
    """When marketing SMS may reach a recipient, in the recipient's local time (from the number's
    region). The rules are the operator's: nothing here is law (README, "Send windows")."""

    # Allowed ranges per weekday, e.g. mon = ["08:00-20:00"]; a weekday left out: no sending.
    hours: dict[Weekday, list[HoursRange]]
    # Local dates with no sending at all (public holidays).
    closed_dates: list[date] = []


class TenantSettings(Section):
    optimove_base_url: str
    api_token: Secret
    secret_key: Secret
    aggregator_api_key: Secret
    default_sender_id: str = ""
    default_region: str = "GB"
    # A number of bare digits valid both as an international number without its "+" (how
    # Optimove's own example writes them: 44123456789) and as a national number of
    # default_region is read this way; the 202 answer lists such recipients.
    bare_digits: Literal["international", "national"] = "international"
    routes: list[Route] = Field(min_length=1)
    validity_s: float = 24 * 3600.0
    # Everything runs except the provider call, simulated with this outcome mix (sub-status ->
    # weight, shared/contract/campaign_controls.py); reports carry the mark in subStatus. Wires a
    # new Optimove tenant, handshake included, before any SMS costs money.
    dry_run: bool = False
    dry_run_outcomes: dict[str, float] = {"Delivered": 0.95, "Undeliverable": 0.05}
    # A shared provider account's rate is shared by the tenants with messages due on it in
    # proportion to this weight, and equally among one tenant's campaigns unless
    # campaign_weights says otherwise (docs/sending.md, "Fair share").
    share_weight: float = Field(default=1.0, gt=0)
    campaign_weights: dict[str, float] = {}
    # Campaign ids sent before bulk traffic, as auto replies are.
    priority_campaigns: list[str] = []
    # Campaign messages go out only inside this window (None: any time); auto replies always go.
    send_window: SendWindow | None = None
    # Per recipient country (ISO region code, e.g. "FR"): replaces send_window for its numbers.
    send_window_by_country: dict[str, SendWindow] = {}

    @field_validator("campaign_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        if any(weight <= 0 for weight in value.values()):
            raise ValueError("weights must be > 0")
        return value

    @field_validator("send_window_by_country")
    @classmethod
    def _region_codes(cls, value: dict[str, SendWindow]) -> dict[str, SendWindow]:
        bad = [
            code for code in value if len(code) != 2 or not code.isalpha() or code != code.upper()
        ]
        if bad:
            raise ValueError(f"{', '.join(bad)}: countries are ISO region codes, e.g. FR")
        return value

    @field_validator("dry_run_outcomes")
    @classmethod
    def _outcome_mix(cls, value: dict[str, float]) -> dict[str, float]:
        if any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return value

    @field_validator("optimove_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")


class ProviderSettings(Section):
    kind: ProviderKind
    base_url: str
    api_key: Secret
    # Octopush authenticates with an account login besides the key.
    api_login: str = ""
    # Octopush: what the messages are for, "alert" (transactional) or "wholesale" (marketing).
    purpose: Literal["alert", "wholesale"] = "alert"
    # Octopush: ask for replies. In France it replaces an alphanumeric sender with a short number,
    # so it is off unless the account wants replies (providers.md §3.1).
    with_replies: bool = False
    # Secret path segment of our callback URL for this account (decisions.md §9).
    callback_token: Secret
    # How long this account's provider waits for our answer to a callback; None: the
    # [callbacks] deadline of its kind.
    callback_deadline_s: float | None = Field(default=None, gt=0)
    # OTPIQ echoes this in X-OTPIQ-Webhook-Secret.
    webhook_secret: Secret | None = None
    # Exact over any one-second window; shared between sender instances (README, "Sending
    # guarantees").
    rate_limit_per_s: float = Field(default=0.0, ge=0)  # 0 = unlimited
    rate_limit_unit: Literal["messages", "segments"] = "messages"
    # The provider counts by its own clock, which sees our sends shifted by network jitter: the
    # limit is kept over windows this much longer than a second, so that jitter up to this
    # cannot put one of the provider's seconds over the limit. Costs this share of throughput.
    rate_limit_jitter_s: float = Field(default=0.01, ge=0, le=0.5)
    # Provider calls in flight at once from one sender instance.
    max_in_flight: int = Field(default=200, ge=1)
    # Circuit breaker (shared/circuit.py): open when at least `circuit_min_calls` calls within
    # `circuit_window_s` failed at a rate of `circuit_failure_rate`; probe after the cool-down.
    circuit_failure_rate: float = Field(default=0.5, gt=0, le=1)
    circuit_min_calls: int = Field(default=20, ge=1)
    circuit_window_s: float = Field(default=30.0, gt=0)
    circuit_cool_down_s: float = Field(default=30.0, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SMSBRIDGE_", env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    ingress: IngressSettings = IngressSettings()
    callbacks: CallbacksSettings = CallbacksSettings()
    sender: SenderSettings = SenderSettings()
    normalizer: NormalizerSettings = NormalizerSettings()
    reporter: ReporterSettings = ReporterSettings()
    campaigns: CampaignsSettings = CampaignsSettings()
    optimove: OptimoveContractSettings = OptimoveContractSettings()
    tenants: dict[str, TenantSettings] = {}
    providers: dict[str, ProviderSettings] = {}
    log_level: LogLevel = "INFO"
    # Development and tests only: let the URLs that carry secrets and campaigns (each tenant's
    # optimove_base_url, the public_urls of ingress and callbacks) be plain http://.
    allow_plain_http: bool = False
    # The event loop of every long-running process (shared/kafka/service.run). uvloop spends about a
    # quarter less CPU per HTTP round trip and Kafka request than asyncio's own loop; "asyncio"
    # is there for platforms without uvloop and for ruling it out when debugging.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _routes_name_known_providers(self) -> Settings:
        for slug, tenant in self.tenants.items():
            for index, route in enumerate(tenant.routes):
                if route.provider not in self.providers:
                    raise ValueError(
                        f"tenants.{slug}.routes.{index}.provider: unknown provider "
                        f"{route.provider!r} (known: {sorted(self.providers)})"
                    )
        return self

    @model_validator(mode="after")
    def _https_unless_allowed(self) -> Settings:
        if self.allow_plain_http:
            return self
        plain = plain_http_keys(self.urls_in_use())
        if plain:
            raise ValueError(
                f"{', '.join(plain)}: must be https:// (allow_plain_http = true permits "
                "http://, for development and tests only)"
            )
        return self

    def urls_in_use(self) -> dict[str, str]:
        """Dotted key -> URL of what must be HTTPS: each tenant's Optimove (its secrets travel
        there), ingress's public_url (what a tenant's Optimove is told at the handshake) when
        there are tenants, callbacks' (what providers are told) when there are providers. The
        loopback defaults of the public_urls count only where they would be used."""
        urls = {
            f"tenants.{slug}.optimove_base_url": tenant.optimove_base_url
            for slug, tenant in self.tenants.items()
        }
        if self.tenants:
            urls["ingress.public_url"] = self.ingress.public_url
        if self.providers:
            urls["callbacks.public_url"] = self.callbacks.public_url
        return urls


def plain_http_keys(urls: dict[str, str]) -> list[str]:
    """The keys of ``urls`` whose URL is not https://."""
    return [key for key, url in urls.items() if not url.strip().lower().startswith("https://")]


def _format_validation_error(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {message}" if key else message)
    if len(problems) == 1:
        return f"invalid configuration in {source}: {problems[0]}"
    return "\n  ".join([f"invalid configuration in {source}:", *problems])


# What `smsbridge dev` and the campaign simulator fall back to, so that a bare
# `smsbridge simulate campaign` in another shell talks to the stack `make dev` started.
DEV_CONFIG_PATH = "deploy/dev/smsbridge.toml"


def configured_path(explicit: str | Path | None) -> str | Path | None:
    """The configuration file: --config, else $SMSBRIDGE_CONFIG, else none."""
    return explicit or os.environ.get(CONFIG_ENV_VAR) or None


def dev_config_path(explicit: str | None) -> str:
    """The dev stack's configuration: --config, else $SMSBRIDGE_CONFIG, else the dev file."""
    return str(configured_path(explicit) or DEV_CONFIG_PATH)


def read_configuration(path: str | Path | None) -> dict[str, Any]:
    """The configured TOML file as written (no validation), {} when there is none; ConfigError
    if it cannot be read."""
    chosen = configured_path(path)
    if not chosen:
        return {}
    try:
        with open(chosen, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {chosen}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {chosen} is not valid TOML: {exc}") from None


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate the configuration, raising ConfigError with the bad key named."""
    data = read_configuration(path)
    source = str(configured_path(path) or "environment")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
