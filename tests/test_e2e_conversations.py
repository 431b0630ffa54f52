"""Conversations that survive a change of endpoint, through a real mitmdump, the mock relay's
endpoint profiles and the anthropic SDK: thinking signatures, model ids an endpoint does (not)
serve or calls by another name, betas and cache TTLs it rejects, tiers chosen by path, rate
limits of one model family, and the merged models list."""

import hashlib
import json
import time
from pathlib import Path

import anthropic
import httpx
import httpx2  # the SDK's HTTP client package: it refuses an httpx.Client
import pytest

from claude_router_dev import mock_relay
from claude_router_dev.harness import sse_events

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


HI = [{"role": "user", "content": "hi"}]
THINK = {"type": "enabled", "budget_tokens": 1024}
SONNET, HAIKU, OPUS = "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"
BEDROCK_SONNET = "anthropic.claude-sonnet-4-5-v1:0"
BEDROCK_HAIKU = "anthropic.claude-haiku-4-5-v1:0"
BETA_1M = "context-1m-2025-08-07"
BETA_OAUTH = "oauth-2025-04-20"


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def configured(start_router, mock, tmp_path: Path, endpoints: list[dict], **options):
    """A router whose endpoints come from a YAML config file (url filled in from the mock)."""
    lines = ["endpoints:"]
    for ep in endpoints:
        ep = {"url": mock.url(ep["name"]), **ep}
        lines.append(f"  - name: {ep.pop('name')}")
        for k, v in ep.items():
            lines.append(f"    {k}: {json.dumps(v)}")  # JSON is YAML
    path = tmp_path / f"router{len(list(tmp_path.glob('router*.yaml')))}.yaml"
    path.write_text("\n".join(lines) + "\n")
    router = start_router([], options={"router_config": str(path), **options})
    router.wait_log("endpoints in price order")
    return router


def sdk(router, base: str = "", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.base + base, api_key="k", max_retries=0, **kw)


def attempts(resp) -> str:
    return resp.headers["x-router-attempts"]


def headers_of(record) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in record["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def betas_of(record) -> list[str]:
    return [b.strip() for v in headers_of(record).get("anthropic-beta", []) for b in v.split(",") if b.strip()]


def status_of(router, name: str) -> dict:
    doc = httpx.get(f"{router.base}/_router/status", timeout=10).json()
    return next(e for e in doc["endpoints"] if e["name"] == name)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Capture:
    """An httpx client for the SDK that keeps the bodies it sends."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.client = httpx2.Client(timeout=30, event_hooks={"request": [self._keep]})

    def _keep(self, request) -> None:
        self.bodies.append(request.read())


# -- 1. a thinking conversation continues across a failover ---------------------------------------


def _turn(client: anthropic.Anthropic, streaming: bool, messages: list) -> tuple[anthropic.types.Message, str]:
    """One thinking turn; the answer and the router's attempts header."""
    kw = dict(model=SONNET, max_tokens=2048, thinking=THINK, messages=messages)
    if streaming:
        with client.messages.stream(**kw) as s:
            types = [e.type for e in s]
            final = s.get_final_message()
            assert types.count("message_start") == 1 and types[-1] == "message_stop"
            return final, attempts(s.response)
    raw = client.messages.with_raw_response.create(**kw)
    return raw.parse(), attempts(raw)


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
def test_thinking_conversation_continues_on_another_endpoint_after_failover(mock, start_router, streaming):
    mock.profile("a", sign_thinking="secret-a")
    mock.profile("b", sign_thinking="secret-b")
    router = start_router(tiers(mock, "a", "b"))
    capture = Capture()
    client = sdk(router, http_client=capture.client)

    turn1, tried = _turn(client, streaming, HI)
    assert tried == "a:200"
    thinking = turn1.content[0]
    assert [b.type for b in turn1.content] == ["thinking", "text"]
    assert thinking.signature == mock_relay.sign_thinking("secret-a", thinking.thinking)

    mock.fault("a", status=529)  # a overloads: turn 2, with a's signed thinking, goes to b
    history = HI + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in turn1.content]},
                    {"role": "user", "content": "and now?"}]
    turn2, tried = _turn(client, streaming, history)
    assert tried == "a:529, b:thinking_signature, b:200"
    assert [b.type for b in turn2.content] == ["thinking", "text"]  # thinking stays on
    assert turn2.content[1].text == "Hello from b. You said: and now?"
    assert turn2.content[0].signature == mock_relay.sign_thinking("secret-b", turn2.content[0].thinking)

    sent = capture.bodies[-1]
    first, second = mock.requests("b")
    assert (first["outcome"], first["body_sha256"]) == ("400", sha(sent))  # as the client sent it
    # The retry: b accepted it, so it held no block signed by a (the mock checks every one), and
    # it is shorter by at least a's thinking text and signature.
    assert second["outcome"] == "200"
    assert second["body_len"] <= len(sent) - len(thinking.thinking) - len(thinking.signature)
    assert [r["outcome"] for r in mock.requests("a")] == ["200", "529"]
    b = status_of(router, "b")
    assert (b["state"], b["consecutive_failures"], b["failures"]) == ("healthy", 0, 0)


def test_thinking_is_turned_off_when_the_last_turn_would_open_with_tool_use(mock, start_router):
    mock.profile("a", sign_thinking="secret-a")
    mock.profile("b", sign_thinking="secret-b")
    mock.fault("a", status=529)
    router = start_router(tiers(mock, "a", "b"))
    text = "The user said: list files. I will answer from a."
    history = [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": text, "signature": mock_relay.sign_thinking("secret-a", text)},
            {"type": "tool_use", "id": "toolu_01", "name": "ls", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt"}]},
    ]
    raw = sdk(router).messages.with_raw_response.create(model=SONNET, max_tokens=2048, thinking=THINK,
                                                        messages=history)
    assert attempts(raw) == "a:529, b:thinking_signature, b:200"
    assert [b.type for b in raw.parse().content] == ["text"]  # b answered without thinking


# -- 2. models an endpoint serves, under its own ids ------------------------------------------------


@pytest.fixture
def mapped(mock, start_router, tmp_path):
    """vertex serves opus only; bedrock serves sonnet under its own id."""
    mock.profile("bedrock", models=[BEDROCK_SONNET])
    return configured(start_router, mock, tmp_path, [
        {"name": "vertex", "models": ["claude-opus-*"]},
        {"name": "bedrock", "models": ["claude-sonnet-*"], "model_map": {SONNET: BEDROCK_SONNET}},
    ])


def test_mapped_model_goes_out_under_the_endpoints_id_and_comes_back_as_the_clients(mock, mapped):
    client = sdk(mapped)
    raw = client.messages.with_raw_response.create(model=SONNET, max_tokens=64, messages=HI)
    assert attempts(raw) == "vertex:skipped:model, bedrock:200"
    answer = raw.parse()
    assert answer.model == SONNET and answer.content[0].text == "Hello from bedrock. You said: hi"
    assert BEDROCK_SONNET not in raw.http_response.text

    with client.messages.stream(model=SONNET, max_tokens=64, messages=HI) as s:
        start = next(e for e in s if e.type == "message_start")
        assert start.message.model == SONNET
        assert s.get_final_message().model == SONNET
        assert attempts(s.response) == "vertex:skipped:model, bedrock:200"

    r = httpx.post(f"{mapped.base}/v1/messages", timeout=30,
                   json={"model": SONNET, "max_tokens": 64, "stream": True, "messages": HI})
    events = sse_events(r.text)
    assert events[0][0] == "message_start" and events[0][1]["message"]["model"] == SONNET
    assert BEDROCK_SONNET not in r.text and events[-1][0] == "message_stop"

    assert mock.count("vertex") == 0  # never asked for a model it does not serve
    assert [rec["model"] for rec in mock.requests("bedrock")] == [BEDROCK_SONNET] * 3
    assert status_of(mapped, "vertex")["consecutive_failures"] == 0


def test_only_the_model_id_changes_in_the_body_sent_upstream(mock, mapped):
    body = ('{ "model" :  "claude-sonnet-4-5",\n "max_tokens": 64, "metadata": {"model": "claude-sonnet-4-5"},'
            ' "messages": [{"role": "user", "content": "caf\\u00e9 \u00e9 \\"model\\": \\"claude-sonnet-4-5\\""}]}'
            ).encode()
    r = httpx.post(f"{mapped.base}/v1/messages", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == SONNET
    expected = body.replace(b'"claude-sonnet-4-5"', b'"anthropic.claude-sonnet-4-5-v1:0"', 1)
    (rec,) = mock.requests("bedrock")
    assert (rec["model"], rec["body_len"], rec["body_sha256"]) == (BEDROCK_SONNET, len(expected), sha(expected))


def test_count_tokens_is_routed_with_the_same_mapping(mock, mapped):
    r = httpx.post(f"{mapped.base}/v1/messages/count_tokens", timeout=30,
                   json={"model": SONNET, "messages": HI})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    assert attempts(r) == "vertex:skipped:model, bedrock:200"
    assert sdk(mapped).messages.count_tokens(model=SONNET, messages=HI).input_tokens > 0
    assert [(rec["path"], rec["model"]) for rec in mock.requests("bedrock")] == \
        [("/v1/messages/count_tokens", BEDROCK_SONNET)] * 2
    assert mock.count("vertex") == 0


def test_a_model_no_endpoint_serves_is_404_and_nobody_is_asked(mock, mapped):
    with pytest.raises(anthropic.NotFoundError) as exc:
        sdk(mapped).messages.create(model=HAIKU, max_tokens=64, messages=HI)
    assert exc.value.body["error"]["type"] == "not_found_error"
    assert HAIKU in exc.value.body["error"]["message"]
    assert attempts(exc.value.response) == "vertex:skipped:model, bedrock:skipped:model"
    r = httpx.post(f"{mapped.base}/v1/messages", timeout=30,
                   json={"model": HAIKU, "max_tokens": 64, "stream": True, "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert mock.count("vertex") == mock.count("bedrock") == 0
    for name in ("vertex", "bedrock"):
        e = status_of(mapped, name)
        assert (e["state"], e["consecutive_failures"], e["failures"]) == ("healthy", 0, 0)


# -- 3. a tier chosen by path ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/droid", "/claude/droid"])
def test_tier_path_starts_at_that_endpoint_and_wraps_round(mock, start_router, prefix):
    mock.fault("droid", status=529)
    mock.fault("ultra", status=529)
    router = start_router(tiers(mock, "aws", "droid", "ultra"), options={"router_max_failures": 10})
    msg = {"model": "mock-model", "max_tokens": 16, "messages": HI}
    r = httpx.post(f"{router.base}{prefix}/v1/messages?beta=true", json=msg, timeout=30)
    assert (r.status_code, attempts(r)) == (200, "droid:529, ultra:529, aws:200")
    assert r.headers["x-used-endpoint"] == "aws"
    assert r.json()["content"][0]["text"] == "Hello from aws. You said: hi"

    raw = sdk(router, prefix).messages.with_raw_response.create(**msg)
    assert attempts(raw) == "droid:529, ultra:529, aws:200"
    with sdk(router, prefix).messages.stream(**msg) as s:
        assert s.get_final_message().content[0].text == "Hello from aws. You said: hi"
        assert attempts(s.response) == "droid:529, ultra:529, aws:200"

    for name in ("aws", "droid", "ultra"):
        records = mock.requests(name)
        assert len(records) == 3
        assert {rec["path"] for rec in records} == {"/v1/messages"}  # the prefix was removed
    assert mock.requests("aws")[0]["query"] == "beta=true"


def test_tier_path_on_a_healthy_tier_uses_it_and_unknown_names_are_not_tiers(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid", "ultra"))
    msg = {"model": "mock-model", "max_tokens": 16, "messages": HI}
    r = httpx.post(f"{router.base}/ultra/v1/messages", json=msg, timeout=30)
    assert attempts(r) == "ultra:200"
    r = httpx.post(f"{router.base}/nosuch/v1/messages", json=msg, timeout=30)
    assert attempts(r) == "aws:404, droid:404"  # forwarded as it is: not a tier
    assert mock.requests("aws")[-1]["path"] == "/nosuch/v1/messages"


# -- 4. rate limits of one model family -----------------------------------------------------------


KEYED = [{"name": "aws", "key": "sk-aws-upstream"}, {"name": "droid", "key": "sk-droid-upstream"}]


def test_family_rate_limit_cools_that_family_only(mock, start_router, tmp_path):
    mock.profile("aws", family_limits={"opus": {"status": 429, "retry_after": 30}})
    router = configured(start_router, mock, tmp_path, KEYED)
    client = sdk(router)

    raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
    assert attempts(raw) == "aws:429, droid:200"
    raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
    assert attempts(raw) == "droid:200"  # opus at aws is cooling: not asked
    raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=16, messages=HI)
    assert attempts(raw) == "aws:200"  # haiku at aws is fine
    with client.messages.stream(model=SONNET, max_tokens=16, messages=HI) as s:
        assert s.get_final_message().content[0].text.startswith("Hello from aws")
        assert attempts(s.response) == "aws:200"

    assert [rec["model"] for rec in mock.requests("aws")] == [OPUS, HAIKU, SONNET]
    aws = status_of(router, "aws")
    assert aws["state"] == "healthy"
    assert aws["families"]["opus"]["state"] == "cooling"
    assert 25 <= aws["families"]["opus"]["cooldown_seconds_left"] <= 30
    assert set(aws["families"]) == {"opus"}
    assert "families" not in status_of(router, "droid")


def test_unified_reset_header_cools_the_family_until_then(mock, start_router, tmp_path):
    reset = int(time.time()) + 40
    mock.fault("aws", status=429, times=1, headers={"anthropic-ratelimit-unified-reset": str(reset),
                                                    "anthropic-ratelimit-unified-status": "rejected"})
    router = configured(start_router, mock, tmp_path, KEYED)
    client = sdk(router)
    raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
    assert attempts(raw) == "aws:429, droid:200"
    raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
    assert attempts(raw) == "droid:200"  # one 429 was enough: it said when to come back
    raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=16, messages=HI)
    assert attempts(raw) == "aws:200"
    fam = status_of(router, "aws")["families"]["opus"]
    assert fam["state"] == "cooling" and 30 <= fam["cooldown_seconds_left"] <= 41


def test_family_overload_without_hint_cools_after_max_failures(mock, start_router, tmp_path):
    mock.profile("aws", family_limits={"opus": {"status": 529}})
    router = configured(start_router, mock, tmp_path, KEYED)
    client = sdk(router)
    for _ in range(3):  # router_max_failures (3)
        raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
        assert attempts(raw) == "aws:529, droid:200"
    raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
    assert attempts(raw) == "droid:200"
    raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=16, messages=HI)
    assert attempts(raw) == "aws:200"
    aws = status_of(router, "aws")
    assert aws["state"] == "healthy" and aws["families"]["opus"]["state"] == "cooling"


# -- 5. an endpoint that turns out not to have the model -----------------------------------------


def test_endpoint_answering_model_not_found_is_skipped_without_blame(mock, start_router):
    mock.profile("vertex", models=[HAIKU, OPUS])  # no sonnet; the router is not told
    router = start_router(tiers(mock, "vertex", "aws"))
    client = sdk(router)
    for _ in range(4):  # more than router_max_failures: still never blamed
        raw = client.messages.with_raw_response.create(model=SONNET, max_tokens=16, messages=HI)
        assert attempts(raw) == "vertex:model_not_found, aws:200"
        assert raw.parse().content[0].text == "Hello from aws. You said: hi"
    with client.messages.stream(model=SONNET, max_tokens=16, messages=HI) as s:
        assert s.get_final_message().content[0].text == "Hello from aws. You said: hi"
        assert attempts(s.response) == "vertex:model_not_found, aws:200"
    raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=16, messages=HI)
    assert attempts(raw) == "vertex:200"
    vertex = status_of(router, "vertex")
    assert (vertex["state"], vertex["consecutive_failures"], vertex["failures"]) == ("healthy", 0, 0)


def test_when_no_endpoint_has_the_model_the_client_gets_the_404(mock, start_router):
    mock.profile("vertex", models=[HAIKU])
    mock.profile("aws", models=[OPUS])
    router = start_router(tiers(mock, "vertex", "aws"))
    with pytest.raises(anthropic.NotFoundError) as exc:
        sdk(router).messages.create(model=SONNET, max_tokens=16, messages=HI)
    assert exc.value.body["error"] == {"type": "not_found_error", "message": f"model: {SONNET}"}
    assert attempts(exc.value.response) == "vertex:model_not_found, aws:model_not_found"
    for name in ("vertex", "aws"):
        e = status_of(router, name)
        assert (e["state"], e["consecutive_failures"], e["failures"]) == ("healthy", 0, 0)


def test_a_400_naming_an_unknown_model_is_skipped_too(mock, start_router):
    mock.fault("vertex", status=400, error_type="invalid_request_error",
               message=f"The model {SONNET} does not exist or is not supported")
    router = start_router(tiers(mock, "vertex", "aws"))
    raw = sdk(router).messages.with_raw_response.create(model=SONNET, max_tokens=16, messages=HI)
    assert attempts(raw) == "vertex:model_not_found, aws:200"


# -- 6. betas and cache TTLs an endpoint rejects ----------------------------------------------------


def test_a_beta_dropped_for_one_endpoint_only(mock, start_router, tmp_path):
    mock.profile("vertex", reject_betas=[BETA_1M])
    router = configured(start_router, mock, tmp_path,
                        [{"name": "vertex", "drop_betas": [BETA_1M]}, {"name": "aws"}])
    client = sdk(router)
    both = {"anthropic-beta": f"{BETA_OAUTH},{BETA_1M}"}
    raw = client.messages.with_raw_response.create(model=SONNET, max_tokens=16, messages=HI,
                                                   extra_headers=both)
    assert attempts(raw) == "vertex:200"
    assert betas_of(mock.requests("vertex")[-1]) == [BETA_OAUTH]

    raw = client.messages.with_raw_response.create(model=SONNET, max_tokens=16, messages=HI,
                                                   extra_headers={"anthropic-beta": BETA_1M})
    assert attempts(raw) == "vertex:200"
    assert "anthropic-beta" not in headers_of(mock.requests("vertex")[-1])  # nothing left to send

    mock.fault("vertex", status=529, times=1)  # aws gets the request, and the beta with it
    with client.messages.stream(model=SONNET, max_tokens=16, messages=HI, extra_headers=both) as s:
        assert s.get_final_message().content[0].text.startswith("Hello from aws")
        assert attempts(s.response) == "vertex:529, aws:200"
    assert betas_of(mock.requests("vertex")[-1]) == [BETA_OAUTH]
    assert betas_of(mock.requests("aws")[-1]) == [BETA_OAUTH, BETA_1M]


def test_cache_ttl_removed_for_an_endpoint_that_rejects_it(mock, start_router, tmp_path):
    mock.profile("vertex", reject_cache_ttl=True)
    router = configured(start_router, mock, tmp_path,
                        [{"name": "vertex", "cache_ttl": False}, {"name": "aws"}])
    body = json.dumps({"model": SONNET, "max_tokens": 16, "system": [
        {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": HI}).encode()

    def post() -> httpx.Response:
        return httpx.post(f"{router.base}/v1/messages", content=body, timeout=30,
                          headers={"content-type": "application/json"})

    r = post()
    assert (r.status_code, attempts(r)) == (200, "vertex:200")
    assert mock.requests("vertex")[-1]["body_sha256"] != sha(body)
    mock.fault("vertex", status=529, times=1)
    r = post()
    assert (r.status_code, attempts(r)) == (200, "vertex:529, aws:200")
    assert mock.requests("aws")[-1]["body_sha256"] == sha(body)  # untouched where supported


# -- 7. the models list --------------------------------------------------------------------------


def test_models_list_is_the_union_in_client_ids(mock, start_router, tmp_path):
    mock.profile("bedrock", models=[BEDROCK_SONNET, BEDROCK_HAIKU])
    mock.profile("vertex", models=[OPUS, "claude-3-haiku", SONNET])
    router = configured(start_router, mock, tmp_path, [
        {"name": "bedrock", "model_map": {SONNET: BEDROCK_SONNET, HAIKU: BEDROCK_HAIKU}},
        {"name": "vertex", "models": ["claude-opus-*", "claude-sonnet-*"]},  # not claude-3-haiku
        {"name": "aws"},  # a plain relay: lists claude-sonnet-4-5
    ])
    models = sdk(router).models.list()
    assert [m.id for m in models.data] == [SONNET, HAIKU, OPUS]
    r = httpx.get(f"{router.base}/v1/models", timeout=30)
    doc = r.json()
    assert [m["id"] for m in doc["data"]] == [SONNET, HAIKU, OPUS]
    assert (doc["first_id"], doc["last_id"], doc["has_more"]) == (SONNET, OPUS, False)
    assert "claude-3-haiku" not in r.text  # vertex lists it, but does not serve it here
    assert all(mock.count(n) == 2 for n in ("bedrock", "vertex", "aws"))


def test_models_list_skips_an_endpoint_that_fails(mock, start_router, tmp_path):
    mock.profile("bedrock", models=[BEDROCK_SONNET])
    mock.profile("vertex", models=[OPUS])
    mock.fault("vertex", status=529)
    router = configured(start_router, mock, tmp_path, [
        {"name": "bedrock", "model_map": {SONNET: BEDROCK_SONNET}}, {"name": "vertex"}])
    assert [m.id for m in sdk(router).models.list().data] == [SONNET]



def test_one_model_from_the_merged_list_can_be_retrieved_by_its_client_id(mock, start_router, tmp_path):
    mock.profile("bedrock", models=["anthropic.claude-sonnet-4-5-v1:0"])
    path = tmp_path / "one.yaml"
    path.write_text(f"""
endpoints:
  - name: bedrock
    url: {mock.url("bedrock")}
    models: ["claude-sonnet-*"]
    model_map: {{claude-sonnet-4-5: anthropic.claude-sonnet-4-5-v1:0}}
""")
    router = start_router([], options={"router_config": str(path)})
    r = httpx.get(f"{router.base}/v1/models/claude-sonnet-4-5", timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "claude-sonnet-4-5"
    r = httpx.get(f"{router.base}/v1/models/claude-opus-4-1", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_the_models_list_passes_on_the_clients_own_credential_answer(mock, start_router, tmp_path):
    path = tmp_path / "keyless.yaml"
    path.write_text(f"""
endpoints:
  - name: bedrock
    url: {mock.url("bedrock")}
    models: ["claude-sonnet-*"]
""")
    router = start_router([], options={"router_config": str(path)})
    mock.fault("bedrock", status=401)  # keyless: the client's own key was refused
    r = httpx.get(f"{router.base}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
