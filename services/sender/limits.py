"""This instance's rate limiter of each provider account: made from the settings, scaled to the
share of the partitions it owns, and changed live (shared/live_config.py) without losing its
record of the sends already made, so a lowered limit holds from the next send."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from services.sender import metrics
from services.sender.ratelimit import SlidingWindowLimiter
from shared.config import ProviderSettings
from shared.contract.topics import RECIPIENTS


class AccountLimits:
    def __init__(
        self, providers: Mapping[str, ProviderSettings], clock: Callable[[], float]
    ) -> None:
        # Every instance starts with no share: it is given one with its partitions.
        self.share = 0.0
        self.clock = clock
        self.by_account: dict[str, SlidingWindowLimiter] = {}
        for account, provider in providers.items():
            self.configure(account, provider)

    def get(self, account: str) -> SlidingWindowLimiter | None:
        return self.by_account.get(account)

    def set_share(self, owned: int) -> None:
        """Each instance takes the share of an account's limit its partitions stand for."""
        self.share = min(1.0, owned / RECIPIENTS.partitions)
        for limiter in self.by_account.values():
            limiter.set_share(self.share)
        self.export()

    def configure(self, account: str, provider: ProviderSettings) -> None:
        """The account's limiter, made, changed to ``provider``'s limit, or gone (unlimited)."""
        limit = provider.rate_limit_per_s
        # Per second, kept over a second plus the jitter allowance.
        window_s = 1.0 + provider.rate_limit_jitter_s
        limiter = self.by_account.get(account)
        if limit <= 0:
            self.by_account.pop(account, None)
        elif limiter is None:
            self.by_account[account] = SlidingWindowLimiter(
                limit, window_s=window_s, share=self.share, clock=self.clock
            )
        else:
            limiter.set_limit(limit, window_s=window_s)

    def export(self) -> None:
        for account, limiter in self.by_account.items():
            metrics.RATE_LIMIT.labels(account).set(limiter.limit / limiter.window_s)
