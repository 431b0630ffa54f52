"""The original's set-up through a real mitmdump: keyless endpoints (channels of one relay),
the client's own key passed through. A 401/402/403/429 about that key fails over, and cools
that channel for that key only."""

import time

import anthropic
import httpx
import pytest

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def sdk(router, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.base, api_key=key, max_retries=0)


def attempts(client) -> str:
    return client.messages.with_raw_response.create(**MSG).headers["x-router-attempts"]


def test_a_429_on_the_cheapest_channel_fails_over_and_skips_it_for_that_key_only(mock, start_router):
    mock.fault("aws", status=429, retry_after=4, key="team-key", times=1)
    router = start_router(tiers(mock, "aws", "droid"))
    team = sdk(router, "team-key")
    asked = time.monotonic()  # the cooldown starts after this ...
    raw = team.messages.with_raw_response.create(**MSG)
    answered = time.monotonic()  # ... and before this
    assert raw.headers["x-router-attempts"] == "aws:429, droid:200"
    assert raw.headers["x-used-endpoint"] == "droid" and raw.parse().content[0].text
    again = attempts(team)
    if time.monotonic() - asked < 4:  # (a very slow machine may have passed the retry-after)
        assert again == "droid:200"  # the cooled channel is skipped for this key
    assert attempts(sdk(router, "other-key")) == "aws:200"  # another key still gets the cheapest
    time.sleep(max(0.0, 4.5 - (time.monotonic() - answered)))
    assert attempts(team) == "aws:200"  # the retry-after has passed: aws again
    status = httpx.get(f"{router.base}/_router/status", timeout=10).json()
    aws = status["endpoints"][0]
    assert (aws["name"], aws["state"], aws["failures"]) == ("aws", "healthy", 0)


def test_a_key_every_channel_rejects_gets_the_last_401_then_that_answer_at_once(mock, start_router):
    for name in ("aws", "droid"):
        mock.fault(name, status=401, key="bad-key")
    router = start_router(tiers(mock, "aws", "droid"))
    with pytest.raises(anthropic.AuthenticationError) as exc:
        sdk(router, "bad-key").messages.create(**MSG)
    assert exc.value.response.headers["x-router-attempts"] == "aws:401, droid:401"
    assert exc.value.body["error"]["type"] == "authentication_error"
    sent = (mock.count("aws"), mock.count("droid"))
    assert sent == (1, 1)  # at most one attempt per endpoint
    with pytest.raises(anthropic.AuthenticationError) as exc:
        sdk(router, "bad-key").messages.create(**MSG)
    assert (mock.count("aws"), mock.count("droid")) == sent  # answered at once, nothing sent
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
    assert attempts(sdk(router, "good-key")) == "aws:200"  # nothing cooled for other keys
    status = httpx.get(f"{router.base}/_router/status", timeout=10)
    shown = [(e["name"], e["state"], e["cooling_for_keys"]) for e in status.json()["endpoints"]]
    assert shown == [("aws", "healthy", 1), ("droid", "healthy", 1)]
    assert "bad-key" not in router.log() and "bad-key" not in status.text


def test_todays_return_rule_hands_the_429_back(mock, start_router):
    mock.fault("aws", status=429, retry_after=4, key="team-key")
    router = start_router(tiers(mock, "aws", "droid"), options={"router_policy": ["client-key:429=return"]})
    with pytest.raises(anthropic.RateLimitError) as exc:
        sdk(router, "team-key").messages.create(**MSG)
    assert exc.value.response.headers["x-router-attempts"] == "aws:429"
    assert mock.count("droid") == 0


def test_key_scopes_are_shared_through_redis(mock, start_router, redis_server):
    mock.fault("aws", status=429, retry_after=30, key="team-key", times=1)
    shared = {"router_redis_url": redis_server.url}
    one = start_router(tiers(mock, "aws", "droid"), options=shared)
    two = start_router(tiers(mock, "aws", "droid"), options=shared)
    assert attempts(sdk(one, "team-key")) == "aws:429, droid:200"
    assert attempts(sdk(two, "team-key")) == "droid:200"  # the other instance skips it too
    assert attempts(sdk(two, "other-key")) == "aws:200"
    keys = redis_server.cli("KEYS", "*")
    assert "team-key" not in keys and "@" in keys  # stored by its keyed hash, never the key
