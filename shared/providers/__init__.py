"""Provider modules by kind, and the callback URL each account is given."""

from __future__ import annotations

from shared.config import Settings
from shared.providers.base import Provider
from shared.providers.dryrun import DryRun
from shared.providers.octopush import Octopush
from shared.providers.opensms import OpenSms
from shared.providers.otpiq import Otpiq

PROVIDER_KINDS: dict[str, type[Provider]] = {
    Otpiq.kind: Otpiq,
    OpenSms.kind: OpenSms,
    Octopush.kind: Octopush,
    # Never configured as an account (``ProviderSettings.kind``): it stands in for the route's
    # account when the tenant runs dry, and the normalizer reads its reports through this map.
    DryRun.kind: DryRun,
}


def provider_class(kind: str) -> type[Provider]:
    return PROVIDER_KINDS[kind]


def callback_url(settings: Settings, account: str) -> str:
    provider = settings.providers[account]
    token = provider.callback_token.get_secret_value()
    base = settings.callbacks.public_url.rstrip("/")
    return f"{base}/callbacks/{provider.kind}/{account}/{token}"
