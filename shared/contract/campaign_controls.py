"""Campaigns: how messages are grouped, and what the operator's controls do to a message.

A campaign is ``(tenant, metadata.campaignId)``. Auto replies come with an empty campaign id
(optimove-sms-api.md §3.4) and are grouped apart under ``AUTO_REPLIES``.

Controls (``sms.campaign-control``, compacted, ``CampaignControl``) hold the latest word per
tenant and per campaign. What a message not yet sent does under them:

- ``cancel`` (of its campaign or of its whole tenant): it is reported ``Failed`` / ``Cancelled``
  and never sent. A cancel stays in force, for messages that arrive later too, until a
  ``resume`` of the same scope; what was cancelled before stays cancelled.
- ``pause``: it is held, without blocking anything else, until a ``resume`` or a ``cancel``.
- otherwise it is sent. Cancel outranks pause, whichever scope each comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from shared.contract.events import CampaignControl

AUTO_REPLIES = "(auto replies)"
_SEPARATOR = "|"


class Effect(StrEnum):
    SEND = "send"
    HOLD = "hold"
    CANCEL = "cancel"


def campaign_group(campaign_id: str) -> str:
    """The name a campaign is counted and controlled under."""
    return campaign_id or AUTO_REPLIES


def control_key(tenant: str, campaign_id: str | None) -> str:
    """Key of a control in ``sms.campaign-control``: the tenant alone, or tenant and campaign."""
    if campaign_id is None:
        return tenant
    return f"{tenant}{_SEPARATOR}{campaign_group(campaign_id)}"


def effect_of(*controls: CampaignControl | None) -> Effect:
    actions = {control.action for control in controls if control is not None}
    if "cancel" in actions:
        return Effect.CANCEL
    if "pause" in actions:
        return Effect.HOLD
    return Effect.SEND


class CampaignControls:
    """What the controls in force say of one message; reads a mirror of the control topic
    (``shared.kafka.store.GlobalTable.get`` or a dict's ``get`` in tests)."""

    def __init__(self, lookup: Callable[[str], dict[str, Any] | None]) -> None:
        self._lookup = lookup

    def control(self, tenant: str, campaign_id: str | None) -> CampaignControl | None:
        value = self._lookup(control_key(tenant, campaign_id))
        return None if value is None else CampaignControl.model_validate(value)

    def effect(self, tenant: str, campaign_id: str) -> Effect:
        return effect_of(self.control(tenant, None), self.control(tenant, campaign_id))
