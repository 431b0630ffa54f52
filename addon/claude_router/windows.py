"""Subscription windows: an endpoint backed by a Claude subscription answers 429 with
``anthropic-ratelimit-unified-5h-status: rejected`` (or ``-7d-``) once its 5-hour or weekly
window is used up. (The overall ``anthropic-ratelimit-unified-status`` with its ``-reset`` is
read by ``policy.cooldown_hint`` as before: it may speak of one model's limit, so it cools the
model family for at most ``max_hint``.) Such a
window reopens at its reset time (``anthropic-ratelimit-unified-5h-reset``: unix seconds, or
RFC 3339 from some relays) and not a moment sooner, so the endpoint cools until then instead
of for the default cooldown, capped by ``router_window_cap``.

Pure: headers and a clock value in, seconds out.
"""

import math
from collections.abc import Mapping
from datetime import datetime

# The unified limits a subscription reports, each with its -status and -reset header.
WINDOWS = ("anthropic-ratelimit-unified-5h", "anthropic-ratelimit-unified-7d")


def reset_time(value: str) -> float | None:
    """A reset header's time as unix seconds: digits (``1767225600``, seconds or with a
    fraction) or RFC 3339 (``2026-01-01T00:00:00Z``); None when it is neither."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) and number > 0 else None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rejected_wait(headers: Mapping[str, str], now: float) -> float:
    """Seconds until the latest rejected window reopens (headers keyed in lower case); 0 when
    no window says ``rejected`` or none of those gives a usable reset in the future."""
    wait = 0.0
    for window in WINDOWS:
        if headers.get(f"{window}-status", "").strip().lower() != "rejected":
            continue
        reset = headers.get(f"{window}-reset")
        at = reset_time(reset) if reset is not None else None
        if at is not None:
            wait = max(wait, at - now)
    return wait


def window_cooldown(wait: float, cap: float) -> float:
    """How long a rejected window cools its endpoint: until the reset, at most ``cap``."""
    return max(0.0, min(wait, cap))
