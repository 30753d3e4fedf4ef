"""What a message ends in, and what the sender does with a provider's answer.

Every message ends in one dispatch record (``accepted``, or ``failed`` with a sub-status); what
nothing could send is also dead-lettered. The outcome is stored before the dispatch record is
published. A provider's answer is accepted, a terminal error, a retry on the same route, a
failover, or an unknown outcome (docs/sending.md: never sent twice).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.sender import metrics
from services.sender.accounts import SendJob
from services.sender.parking import park
from services.sender.routing import expires_at
from services.sender.state import STAGE, SendState, StateWriter, message_of
from shared import metrics as shared_metrics
from shared.config import Settings, TenantSettings
from shared.contract.events import DeadLetter, DispatchRecord, utcnow
from shared.contract.ids import tenant_number_key, unsent_correlation_key
from shared.contract.segments import count_segments
from shared.contract.statuses import SubStatus
from shared.contract.topics import DEAD_LETTERS, DISPATCHES, PROVIDER_EVENTS, RECIPIENTS
from shared.kafka.clients import OutRecord
from shared.logs import mask_number, scrub
from shared.providers import dryrun
from shared.providers.base import OutboundSms, Provider, SendAccepted, SendError, SendResult
from shared.providers.dryrun import DryRun
from shared.retry import RetryPolicy

log = logging.getLogger(__name__)

# Used to decide how long an outcome is remembered when the tenant is not configured here.
_DEFAULT_VALIDITY_S = 24 * 3600.0
_EXPECTED_FAILURES = frozenset(
    {SubStatus.OPTED_OUT, SubStatus.EXPIRED, SubStatus.CANCELLED, SubStatus.OUTSIDE_SEND_WINDOW}
)
_DEFAULT_DRY_RUN_OUTCOMES: dict[str, float] = TenantSettings.model_fields[
    "dry_run_outcomes"
].default
# Moved once per accepted message: label lookups done once.
_ACCEPTED = metrics.DISPATCHES.labels("accepted", SubStatus.SENT)
_DRY_RUN_SENT = dryrun.marked(SubStatus.SENT)
_SEGMENTS = {encoding: metrics.SEGMENTS.labels(encoding) for encoding in ("gsm7", "ucs2")}


@dataclass(frozen=True)
class Next:
    """What an attempt left to do: nothing (settled), or go on at once with ``state``."""

    state: SendState | None = None


def may_resend(provider: type[Provider] | None, state: SendState) -> bool:
    """An identical call can be recognised by the provider: it de-duplicates resent calls and
    this message was a call of its own."""
    return (
        provider is not None and provider.deduplicates_resends and state.call == [state.message_id]
    )


class Outcomes:
    def __init__(
        self,
        settings: Settings,
        writer: StateWriter,
        schedule: RetryPolicy,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.schedule = schedule
        self.clock = clock

    # -- a provider's answer -----------------------------------------------------------------

    async def settle(
        self, partition: int, state: SendState, job: SendJob, result: SendResult, provider: Provider
    ) -> Next:
        """Record what the provider said; returns the state to go on with at once, if any."""
        account = state.account
        state.resend = False
        if isinstance(result, SendAccepted):
            dispatch = self._accepted(state, job.sms, result, provider.kind, dry_run=job.dry_run)
            await self.finish(partition, state, dispatch)
            return Next()
        error = result
        state.last_error = scrub(error.detail)[:300]
        state.last_status_code = error.status_code
        if error.maybe_accepted:
            if may_resend(type(provider), state) and self.schedule.may_retry(state.attempt):
                state.resend = True
                if await self._park_retry(partition, state, error):
                    return Next()
                state.resend = False
            metrics.UNKNOWN_OUTCOMES.labels(account, "call").inc()
            detail = (
                f"outcome unknown: {state.last_error} (the call to {account} may have reached "
                "the provider; not sent again to avoid a double send)"
            )
            await self.fail(partition, state, SubStatus.PROVIDER_ERROR, detail, account)
            return Next()
        if not error.retryable:
            await self.fail(partition, state, error.sub_status, state.last_error, account)
            return Next()
        if self.schedule.may_retry(state.attempt) and await self._park_retry(
            partition, state, error
        ):
            return Next()
        # This route is used up: the next one, at once (recorded first, so that a crash now
        # cannot leave the intent of a call that is known to have failed).
        metrics.FAILOVERS.labels(account).inc()
        log.info(
            "giving up on %s after %d attempt(s): %s",
            account,
            state.attempt,
            state.last_error,
            extra={"message_id": job.sms.message_id},
        )
        state.given_up.append(account)
        state.account, state.attempt = "", 0
        await park(self.writer, partition, state, self.clock(), "retry")
        return Next(state)

    async def _park_retry(self, partition: int, state: SendState, error: SendError) -> bool:
        """Park for another attempt on this route; False when it would land past validity."""
        message = message_of(state)
        delay = self.schedule.delay(state.attempt, error.retry_after_s)
        due = self.clock() + delay
        if due > self._expiry(state):
            return False
        metrics.RETRIES.labels(state.account).inc()
        log.debug(
            "send via %s failed (%s); attempt %d again in %.2fs",
            state.account,
            state.last_error,
            state.attempt + 1,
            delay,
            extra={"message_id": message.context.message_id},
        )
        await park(self.writer, partition, state, due, "retry")
        return True

    def _accepted(
        self,
        state: SendState,
        sms: OutboundSms,
        accepted: SendAccepted,
        provider_kind: str,
        *,
        dry_run: bool,
    ) -> DispatchRecord:
        message = message_of(state)
        segments = count_segments(sms.text)
        _SEGMENTS[segments.encoding].inc(segments.segments)
        if dry_run:
            kind, sub_status = DryRun.kind, _DRY_RUN_SENT
            metrics.DISPATCHES.labels("accepted", sub_status).inc()
        else:
            kind, sub_status = provider_kind, SubStatus.SENT
            _ACCEPTED.inc()
        log.debug(
            "sent %s via %s as %s",
            mask_number(message.destination),
            state.account,
            accepted.provider_message_id,
            extra={"message_id": sms.message_id, "segments": segments.segments},
        )
        return DispatchRecord(
            context=message.context,
            correlation_key=accepted.correlation_key,
            outcome="accepted",
            sub_status=sub_status,
            provider_kind=kind,
            provider_account=state.account,
            provider_message_id=accepted.provider_message_id,
            destination=message.destination,
            segments=segments.segments,
            dispatched_at=utcnow(),
            sender_id=sms.sender_id,
        )

    # -- the end of a message ----------------------------------------------------------------

    async def fail(
        self,
        partition: int,
        state: SendState,
        sub_status: str,
        detail: str,
        account: str = "",
        *,
        dead_letter: bool = False,
    ) -> None:
        message = message_of(state)
        metrics.DISPATCHES.labels("failed", sub_status).inc()
        # Opt-outs and expiries are the business working as intended; the rest needs a look.
        level = logging.INFO if sub_status in _EXPECTED_FAILURES else logging.WARNING
        log.log(
            level,
            "not sent to %s: %s (%s)",
            mask_number(message.destination),
            sub_status,
            detail,  # JsonFormatter masks the digit runs a provider's text may echo
            extra={"message_id": message.context.message_id, "tenant": message.context.tenant},
        )
        provider = self.settings.providers.get(account) if account else None
        dispatch = DispatchRecord(
            context=message.context,
            correlation_key=unsent_correlation_key(message.context.message_id),
            outcome="failed",
            sub_status=sub_status,
            provider_kind=provider.kind if provider is not None else "",
            provider_account=account,
            destination=message.destination,
            detail=detail,
            dispatched_at=utcnow(),
            sender_id=message.sender_id,
        )
        letter = None
        if dead_letter:
            shared_metrics.DEAD_LETTERS.labels(STAGE, RECIPIENTS.name).inc()
            letter = DeadLetter(
                source_topic=RECIPIENTS.name,
                stage=STAGE,
                reason=f"{sub_status}: {detail}",
                key=tenant_number_key(message.context.tenant, message.destination),
                payload=message.to_bytes().decode("utf-8"),
                attempts=state.attempts,
                status_code=state.last_status_code,
                response_excerpt=state.last_error,
                redrive_topic=RECIPIENTS.name,
            )
        await self.finish(partition, state, dispatch, letter)

    async def finish(
        self,
        partition: int,
        state: SendState,
        dispatch: DispatchRecord,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        """Outcome first, then the dispatch: a stored outcome always has its dispatch record
        published eventually (a redelivered record republishes it)."""
        forget_at = max(self.clock(), self._expiry(state)) + self.settings.sender.keep_outcome_s
        stored_reason = state.park_reason
        state.phase, state.park_reason, state.call = "done", None, []
        state.dispatch, state.message = dispatch, None
        writer = self.writer
        await writer.publish_persistently(writer.put(partition, state, forget_at, stored_reason))
        outputs = self.dispatch_outputs(dispatch)
        if dead_letter is not None:
            outputs.append(OutRecord(DEAD_LETTERS, dead_letter.key or "", dead_letter))
        await writer.publish_persistently(outputs)

    async def republish(self, state: SendState) -> None:
        """A settled message seen again: its dispatch record once more (consumers de-duplicate)."""
        if state.dispatch is not None:
            await self.writer.publish_persistently(self.dispatch_outputs(state.dispatch))

    def dispatch_outputs(self, dispatch: DispatchRecord) -> list[OutRecord]:
        """A dispatch record, and for a dry run's accepted one the report the provider would
        have called back with (the same every time, so a republished pair changes nothing)."""
        outputs = [OutRecord(DISPATCHES, dispatch.correlation_key, dispatch)]
        if dispatch.provider_kind == DryRun.kind and dispatch.outcome == "accepted":
            tenant = self.settings.tenants.get(dispatch.context.tenant)
            outcomes = tenant.dry_run_outcomes if tenant is not None else _DEFAULT_DRY_RUN_OUTCOMES
            report = dryrun.delivery_report(dispatch, outcomes)
            outputs.append(OutRecord(PROVIDER_EVENTS, report.correlation_key, report))
        return outputs

    def _expiry(self, state: SendState) -> float:
        message = message_of(state)
        tenant = self.settings.tenants.get(message.context.tenant)
        validity = tenant.validity_s if tenant is not None else _DEFAULT_VALIDITY_S
        return expires_at(message, validity).timestamp()
