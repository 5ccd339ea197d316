"""The terms every product shares: the partner's own numbers (`out_trade_no`,
`out_request_no`), subjects, notify URLs, and Alipay's durations (`timeout_express`)."""

from __future__ import annotations

import re
from typing import Final

OUT_NO_PATTERN: Final = r"^[A-Za-z0-9_]{1,64}$"  # out_trade_no and out_request_no
SUBJECT_LENGTH_MAX: Final = 256
NOTIFY_URL_PATTERN: Final = r"^https?://\S+$"
NOTIFY_URL_LENGTH_MAX: Final = 1024
EXPRESS_PATTERN: Final = r"^[1-9][0-9]{0,5}[mhd]$"  # Alipay's "90m", "2h", "15d"

_EXPRESS_RE: Final = re.compile(EXPRESS_PATTERN)
_EXPRESS_UNIT_S: Final = {"m": 60, "h": 3600, "d": 86_400}


def express_s(text: str) -> int | None:
    """Seconds in an Alipay duration ("90m", "2h", "15d"), or None if it is not one."""
    if not _EXPRESS_RE.fullmatch(text):
        return None
    return int(text[:-1]) * _EXPRESS_UNIT_S[text[-1]]


def express_error(text: str, terms: tuple[str, str, str]) -> str | None:
    """Why `text` is not a duration within `terms` (default, least, most), or None."""
    _, least, most = terms
    seconds = express_s(text)
    if seconds is None:
        return f"{text!r} is not a duration such as 90m, 2h or 15d"
    if not must_s(least) <= seconds <= must_s(most):
        return f"{text!r} is outside {least} to {most}"
    return None


def must_s(express: str) -> int:
    """Seconds in a duration this code wrote itself (a default or a bound)."""
    seconds = express_s(express)
    assert seconds is not None, express
    return seconds
