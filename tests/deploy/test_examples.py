"""The example configurations in deploy/examples/ are valid settings, and mean what they say."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

from services.sender.windows import opens_at
from tests.support import TENANT, make_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_the_send_window_example_is_a_valid_tenant_configuration() -> None:
    example = tomllib.loads((EXAMPLES / "send-windows.toml").read_text(encoding="utf-8"))
    tenant = make_settings(overrides={"tenants": {TENANT: example["tenants"][TENANT]}}).tenants[
        TENANT
    ]
    france = tenant.send_window_by_country["FR"]
    # Christmas Day 2026 is a Friday: closed in France, open in London.
    noon = datetime.fromisoformat("2026-12-25T12:00+01:00").timestamp()
    assert opens_at(france, "+33612345678", noon) is not None
    assert tenant.send_window is not None
    assert opens_at(tenant.send_window, "+447700900123", noon) is None
    # Sunday is closed everywhere in the example.
    sunday = datetime.fromisoformat("2026-12-27T12:00+00:00").timestamp()
    assert opens_at(tenant.send_window, "+447700900123", sunday) is not None
