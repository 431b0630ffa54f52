"""``POST /v1/messages/count_tokens`` under Claude Code's gateway contract: optional for a
gateway, and never worth a wait.

Claude Code counts tokens often (``/context`` fires 14 calls at once, large file reads more)
and retries a failing call up to 10 times, stalling its user (LiteLLM PR #39597). So a
count_tokens request gets one attempt, at the endpoint the router would use first, bounded by
``DEADLINE``; its failure blames nobody (a relay that does not count tokens is not a broken
relay); and any answer that is not the client's own (a 5xx, a rate limit, a timeout, every
endpoint cooling) becomes a fast ``404 not_found_error``, which Claude Code does not retry:
it estimates instead. Pure functions; `exchange` applies them.
"""

import dataclasses

from . import policy
from .errors import error_body
from .policy import Verdict
from .routing import Answer, Settings

PATH = "/v1/messages/count_tokens"
DEADLINE = 30.0  # seconds at most for its one attempt
# The client's own answers, relayed as the endpoint sent them: a bad request, too large.
_CLIENTS = frozenset({400, 413})


def applies(method: str, target: str) -> bool:
    """Is this a count_tokens request (whatever its query string)?"""
    return method == "POST" and target.split("?", 1)[0] == PATH


def settings(base: Settings) -> Settings:
    """One attempt, bounded, and nothing it meets counted against an endpoint (made once per
    change of the router's settings)."""
    global _made
    if _made is not None and _made[0] is base:
        return _made[1]
    rules = {k: Verdict.SKIP if v is Verdict.COUNT else v for k, v in base.rules.items()}
    rules.setdefault("4xx", Verdict.CLIENT)
    rules.setdefault("5xx", Verdict.SKIP)  # (an unmatched status would count)
    made = dataclasses.replace(base, max_attempts=1, deadline=min(base.deadline, DEADLINE), rules=rules)
    _made = (base, made)
    return made


_made: tuple[Settings, Settings] | None = None


def answer(got: Answer) -> Answer:
    """What the client gets when the attempt did not succeed: the endpoint's own answer about
    the request (400, 413) or the client's key (401/403 from an endpoint that received the
    client's credentials), else a fast 404 that Claude Code accepts without retrying."""
    ep = got.endpoint
    if got.status == 404 or (got.status in _CLIENTS and ep is not None):
        return got  # (a 404 already: the endpoint's, or the router's "no such model")
    if got.status in (401, 403) and ep is not None and not ep.own_credentials:
        return got
    etype, _ = policy.error_of(got.body)
    why = f"HTTP {got.status}" + (f" {etype}" if etype else "")
    message = (f"token counting is not available right now ({why}); count_tokens is optional "
               "for this gateway: estimate locally")
    return Answer(404, "", [("content-type", "application/json")], error_body(404, message, "not_found_error"))
