"""The operator's campaign controls as the sender applies them
(``shared/contract/campaign_controls.py`` says what pause, resume and cancel mean for a message;
this module says when the sender asks).

The sender asks before every send attempt (scheduled, retried and failed-over ones included) and
again when a call's turn has come, after the rate limit's wait and the bulk gathering, right
before the provider is called: a pause or cancel seen by the control table stops every call that
has not started yet. ``ControlGate`` answers from the table's mirror (a ``GlobalTable`` on
``sms.campaign-control`` that follows it with ~100 ms polls), caching answers until the table
reports a change, so that asking on every send costs a dictionary lookup.

When the controls change (or partitions are assigned), the parked messages of this instance are
looked at again: ``released_by`` tells which ones the change concerns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.contract.campaign_controls import CampaignControls, Effect
from shared.contract.events import CampaignControl

# Distinct (tenant, campaign) answers kept; past it the cache starts again (campaigns come and go).
_MAX_CACHED = 10_000


class ControlGate:
    def __init__(self, lookup: Callable[[str], dict[str, Any] | None]) -> None:
        self._controls = CampaignControls(lookup)
        self._effects: dict[tuple[str, str], Effect] = {}

    def effect(self, tenant: str, campaign_id: str) -> Effect:
        key = (tenant, campaign_id)
        effect = self._effects.get(key)
        if effect is None:
            if len(self._effects) >= _MAX_CACHED:
                self._effects.clear()
            effect = self._effects[key] = self._controls.effect(tenant, campaign_id)
        return effect

    def changed(self) -> None:
        """The table changed: every answer is asked afresh."""
        self._effects.clear()

    def cancel_detail(self, tenant: str, campaign_id: str) -> str:
        """Why a message is cancelled, for its dispatch record's detail (and the logs)."""
        for control in (
            self._controls.control(tenant, campaign_id),
            self._controls.control(tenant, None),
        ):
            if control is not None and control.action == "cancel":
                return _describe(control)
        return "campaign cancelled"


def released_by(effect: Effect, park_reason: str) -> bool:
    """Does a control change release a parked message at once? A cancel ends every wait (the
    message is reported now, not when its schedule or retry comes); a resume ends a hold.
    Others wait for their time and are asked again then."""
    return effect is Effect.CANCEL or (effect is Effect.SEND and park_reason == "held")


def _describe(control: CampaignControl) -> str:
    scope = "campaign cancelled" if control.campaign_id is not None else "tenant cancelled"
    by = f" by {control.requested_by}" if control.requested_by else ""
    reason = f": {control.reason}" if control.reason else ""
    return f"{scope}{by}{reason}"[:300]
