"""What the sender consults before every send: the opt-out list, when customers last wrote, and
the operator's campaign controls, each the mirror of a compacted topic (a ``GlobalTable``, or a
dict in tests). ``optouts.py`` and ``controls.py`` decide; this module holds the tables."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from services.sender.controls import ControlGate
from services.sender.optouts import OptOutVerdict, opt_out_verdict
from shared.config import Settings
from shared.contract.campaign_controls import Effect
from shared.contract.events import RecipientMessage
from shared.contract.ids import tenant_number_key
from shared.contract.topics import CAMPAIGN_CONTROL, LAST_INBOUND, OPT_OUTS
from shared.kafka.store import GlobalTable
from shared.logs import mask_number

log = logging.getLogger(__name__)


class TableLookup(Protocol):
    """A mirror of a compacted topic (``GlobalTable``, or a dict in tests)."""

    def get(self, key: str) -> dict[str, Any] | None: ...


class Lookups:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        opt_outs: TableLookup | None,
        last_inbound: TableLookup | None,
        controls: TableLookup | None,
        on_controls_change: Callable[[Sequence[str]], None],
    ) -> None:
        """Tables not given are ``GlobalTable``s started by ``start``; ``last_inbound`` is empty
        when only ``opt_outs`` is given; a caller that gives its own ``controls`` calls
        ``on_controls_change`` when they change."""
        self.settings = settings
        self._name = name
        self._opt_outs = opt_outs
        self._opt_out_table: GlobalTable | None = None
        self._last_inbound: TableLookup | None = (
            last_inbound if opt_outs is None else (last_inbound or {})
        )
        self._last_inbound_table: GlobalTable | None = None
        self._gate = ControlGate(controls.get) if controls is not None else None
        self._control_table: GlobalTable | None = None
        self._on_controls_change = on_controls_change

    async def start(self) -> None:
        kafka, name = self.settings.kafka, self._name
        if self._opt_outs is None:
            self._opt_out_table = GlobalTable(kafka, OPT_OUTS, name=f"{name}-opt-outs")
            # No send without the opt-out list (decisions.md §6): a table that cannot catch up
            # fails the start.
            await self._opt_out_table.start()
            self._opt_outs = self._opt_out_table
        if self._last_inbound is None:
            self._last_inbound_table = GlobalTable(kafka, LAST_INBOUND, name=f"{name}-last-inbound")
            await self._last_inbound_table.start()
            self._last_inbound = self._last_inbound_table
        if self._gate is None:
            self._control_table = GlobalTable(
                kafka,
                CAMPAIGN_CONTROL,
                name=f"{name}-campaign-control",
                on_change=self._on_controls_change,
            )
            self._gate = ControlGate(self._control_table.get)
            # Nothing is sent before the operator's controls are known: a paused campaign
            # stays paused for an instance that starts now.
            await self._control_table.start()

    async def stop(self) -> None:
        if self._opt_out_table is not None:
            await self._opt_out_table.stop()
            self._opt_out_table = None
            self._opt_outs = None
        if self._last_inbound_table is not None:
            await self._last_inbound_table.stop()
            self._last_inbound_table = None
            self._last_inbound = None
        if self._control_table is not None:
            await self._control_table.stop()
            self._control_table = None
            self._gate = None

    def effect(self, tenant: str, campaign_id: str) -> Effect:
        return self._controls().effect(tenant, campaign_id)

    def effect_on(self, message: RecipientMessage) -> Effect:
        return self.effect(message.context.tenant, message.context.campaign_id)

    def cancel_detail(self, message: RecipientMessage) -> str:
        return self._controls().cancel_detail(message.context.tenant, message.context.campaign_id)

    def controls_changed(self, keys: Sequence[str]) -> None:
        """Every answer is asked afresh; what changes after the catch-up at start is logged."""
        if self._gate is not None:
            self._gate.changed()
        if self._control_table is not None and self._control_table.ready:
            for key in keys:
                control = self._control_table.get(key)
                action = control.get("action") if control is not None else "(removed)"
                log.info("campaign control %s: %s", key, action)

    def opted_out(self, message: RecipientMessage) -> bool:
        """The opt-out list stops the message (``optouts.py`` decides)."""
        opt_outs, last_inbound = self._opt_outs, self._last_inbound
        if opt_outs is None or last_inbound is None:
            raise RuntimeError("the sender's start() was not called (no opt-out list)")
        key = tenant_number_key(message.context.tenant, message.destination)
        verdict = opt_out_verdict(
            message,
            opt_outs.get(key),
            lambda: last_inbound.get(key),
            self.settings.sender.reply_window_s,
        )
        if verdict is OptOutVerdict.SEND_AUTO_REPLY:
            log.info(
                "auto reply to opted-out %s let through: the customer wrote to us lately",
                mask_number(message.destination),
                extra={"message_id": message.context.message_id},
            )
        return verdict is OptOutVerdict.SUPPRESS

    def _controls(self) -> ControlGate:
        if self._gate is None:
            raise RuntimeError("the sender's start() was not called (no campaign controls)")
        return self._gate
