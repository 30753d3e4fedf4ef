"""How long the callbacks service may take before it answers a provider 503 (issue 14, point 13)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.callbacks.app import answer_deadline_s
from shared.config import CallbacksSettings, ProviderSettings


def account(kind: str, **extra: object) -> ProviderSettings:
    return ProviderSettings.model_validate(
        {"kind": kind, "base_url": "https://p.example", "api_key": "k", "callback_token": "t"}
        | extra
    )


def test_octopush_is_answered_within_its_one_second() -> None:
    # providers.md §3: "The URL must answer in under 1 second".
    assert answer_deadline_s(CallbacksSettings(), account("octopush")) < 1.0


@pytest.mark.parametrize("kind", ["otpiq", "opensms"])
def test_other_providers_get_the_general_deadline(kind: str) -> None:
    assert answer_deadline_s(CallbacksSettings(), account(kind)) == 5.0
    assert answer_deadline_s(CallbacksSettings(deadline_s=3.0), account(kind)) == 3.0


def test_a_kind_and_an_account_can_have_their_own() -> None:
    callbacks = CallbacksSettings.model_validate({"deadline_by_kind_s": {"opensms": 2.0}})
    assert answer_deadline_s(callbacks, account("opensms")) == 2.0
    # A partial table keeps Octopush's default.
    assert answer_deadline_s(callbacks, account("octopush")) == 0.8
    assert answer_deadline_s(callbacks, account("octopush", callback_deadline_s=0.5)) == 0.5
    assert answer_deadline_s(callbacks, account("otpiq", callback_deadline_s=9.0)) == 9.0


@pytest.mark.parametrize(
    "settings",
    [{"deadline_s": 0}, {"deadline_by_kind_s": {"octopush": -1}}, {"deadline_by_kind_s": {"x": 1}}],
)
def test_deadlines_that_cannot_work_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CallbacksSettings.model_validate(settings)
