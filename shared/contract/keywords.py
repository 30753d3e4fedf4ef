"""Opt-out and opt-in keywords (decisions.md §6): a reply that is exactly one of these words.

Only the whole message counts, trimmed and in any case: "STOP" and " stop\\n" opt out, "please
stop texting me" does not. Accents are compared as written once composed (NFC), so "ARRÊT"
matches "arrêt" whichever way the handset encoded the "Ê"; the unaccented "ARRET" is a keyword of
its own, because customers type both.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

DEFAULT_OPT_OUT_KEYWORDS: tuple[str, ...] = (
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
    "ARRET",
    "ARRÊT",
)
DEFAULT_OPT_IN_KEYWORDS: tuple[str, ...] = ("START", "UNSTOP")

KeywordAction = Literal["opt_out", "opt_in"]


def normalize_keyword(text: str) -> str:
    """The form a message and a keyword are compared in."""
    return unicodedata.normalize("NFC", text).strip().casefold()


def overlapping_keywords(opt_out: Iterable[str], opt_in: Iterable[str]) -> set[str]:
    return {normalize_keyword(k) for k in opt_out} & {normalize_keyword(k) for k in opt_in}


@dataclass(frozen=True)
class KeywordRules:
    opt_out: frozenset[str]
    opt_in: frozenset[str]

    @classmethod
    def of(
        cls,
        opt_out: Iterable[str] = DEFAULT_OPT_OUT_KEYWORDS,
        opt_in: Iterable[str] = DEFAULT_OPT_IN_KEYWORDS,
    ) -> KeywordRules:
        both = overlapping_keywords(opt_out, opt_in)
        if both:
            raise ValueError(f"keywords both opt out and opt in: {sorted(both)}")
        return cls(
            frozenset(normalize_keyword(k) for k in opt_out if k.strip()),
            frozenset(normalize_keyword(k) for k in opt_in if k.strip()),
        )

    def classify(self, text: str) -> KeywordAction | None:
        """``opt_out`` / ``opt_in`` when the whole message is a keyword, else None."""
        word = normalize_keyword(text)
        if word in self.opt_out:
            return "opt_out"
        if word in self.opt_in:
            return "opt_in"
        return None
