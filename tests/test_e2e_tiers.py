"""Load within a price tier, through a real mitmdump and the mock relay (two endpoints of one
mock, a and b, at one price): weights split new conversations exactly, a conversation's later
turns stay where it is, max_concurrency is never exceeded at the relay and nothing fails when
every endpoint is at its cap, a busy endpoint is skipped without blame, and the in-flight
counts come back to zero after errors and clients that leave."""

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import sse_events

MODEL = "claude-sonnet-4-5"
USER = "user_" + "0" * 64 + "_account__session_"  # Claude Code's metadata.user_id, before the uuid


def start(start_router, mock, tmp_path, a: str = "", b: str = "", **options):
    """A router with endpoints a and b at one price; ``a``/``b``: extra YAML fields of each."""
    path = tmp_path / "router.yaml"
    path.write_text(f"""
endpoints:
  - name: a
    url: {mock.url("a")}
    price: {{input: 3, output: 15}}
    {a}
  - name: b
    url: {mock.url("b")}
    price: {{input: 3, output: 15}}
    {b}
""")
    return start_router([], options={"router_config": str(path), **options})


def body(session: str, text: str = "hello", stream: bool = False, history: list | None = None) -> dict:
    return {"model": MODEL, "max_tokens": 32, "stream": stream,
            "metadata": {"user_id": USER + session},
            "messages": (history or []) + [{"role": "user", "content": text}]}


def send(client: httpx.Client, router, session: str, **kw) -> httpx.Response:
    r = client.post(f"{router.base}/v1/messages", json=body(session, **kw), timeout=60)
    assert r.status_code == 200, r.text
    return r


def status(router) -> dict:
    return {e["name"]: e for e in httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"]}


def settled(router) -> dict:
    """The status once nothing is in flight at any endpoint (waited for)."""
    def idle():
        st = status(router)
        return st if all(e["in_flight"] == 0 for e in st.values()) else None
    return until(idle)


def until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return got


def new_sessions(router, n: int) -> Counter:
    with httpx.Client() as client:
        return Counter(send(client, router, str(uuid.uuid4())).headers["x-used-endpoint"] for _ in range(n))


def test_weights_one_to_one_split_200_new_sessions_evenly(mock, start_router, tmp_path):
    router = start(start_router, mock, tmp_path)
    went = new_sessions(router, 200)
    assert abs(went["a"] - 100) <= 14 and abs(went["b"] - 100) <= 14, went  # 50 +/- 7 %
    assert mock.count("a") == went["a"] and mock.count("b") == went["b"]


def test_weights_three_to_one_split_200_new_sessions_three_to_one(mock, start_router, tmp_path):
    router = start(start_router, mock, tmp_path, a="weight: 3", b="weight: 1")
    went = new_sessions(router, 200)
    assert abs(went["a"] - 150) <= 14 and abs(went["b"] - 50) <= 14, went  # 75/25 +/- 7 %


def test_a_conversations_later_turns_stay_on_its_endpoint(mock, start_router, tmp_path):
    router = start(start_router, mock, tmp_path)
    sessions = [str(uuid.uuid4()) for _ in range(20)]
    history: dict[str, list] = {s: [] for s in sessions}
    home: dict[str, str] = {}
    with httpx.Client() as client:
        for turn in range(3):  # every conversation's turn 1, then every turn 2, then 3
            for s in sessions:
                r = send(client, router, s, text=f"turn {turn}", history=history[s])
                history[s] += [{"role": "user", "content": f"turn {turn}"},
                               {"role": "assistant", "content": r.json()["content"][0]["text"]}]
                home.setdefault(s, r.headers["x-used-endpoint"])
                assert r.headers["x-used-endpoint"] == home[s], (s, turn)
    assert Counter(home.values()) == {"a": 10, "b": 10}


def test_claude_code_conversations_stay_where_their_cache_is_warm(mock, start_router, tmp_path):
    from test_e2e_sessions import Conversation  # Claude Code's session header and cache breakpoints
    mock.profile("a", cache=True)
    mock.profile("b", cache=True)
    router = start(start_router, mock, tmp_path)
    convs = [Conversation(str(uuid.uuid4())) for _ in range(6)]
    homes = [c.turn(router, "hello", stream=True)["x-used-endpoint"] for c in convs]
    assert Counter(homes) == {"a": 3, "b": 3}
    for text in ("and then?", "and now?"):
        for c, home in zip(convs, homes):
            h = c.turn(router, text, stream=True)
            assert h["x-used-endpoint"] == home
            assert mock.requests(home)[-1]["usage"]["cache_read_input_tokens"] > 1000


def test_requests_without_a_conversation_are_spread_too(mock, start_router, tmp_path):
    router = start(start_router, mock, tmp_path)
    with httpx.Client() as client:
        went = Counter(client.post(f"{router.base}/v1/messages/count_tokens", timeout=30,
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                                   ).headers["x-used-endpoint"] for _ in range(20))
    assert went == {"a": 10, "b": 10}


def stream_one(router, session: str) -> tuple[int, list]:
    with httpx.stream("POST", f"{router.base}/v1/messages", json=body(session, stream=True), timeout=60) as r:
        raw = r.read()
    return r.status_code, sse_events(raw)


def test_a_cap_of_4_is_never_exceeded_under_32_concurrent_streams_and_nothing_fails(mock, start_router, tmp_path):
    mock.fault("a", event_gap_ms=40)  # slow streams: each holds its slot for a while
    mock.fault("b", event_gap_ms=40)
    router = start(start_router, mock, tmp_path, a="max_concurrency: 4", b="max_concurrency: 4")
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: stream_one(router, str(uuid.uuid4())), range(32)))
    for code, events in results:
        assert code == 200
        assert events[-1][0] == "message_stop"
    peak = mock.inflight()["peak"]
    assert peak["a"] <= 4 and peak["b"] <= 4, peak
    assert peak["a"] + peak["b"] >= 5, peak  # the 32 were in flight together: the cap held them back
    assert mock.count("a") + mock.count("b") == 32  # each sent once: waiting is not retrying
    st = settled(router)
    assert st["a"]["failures"] == st["b"]["failures"] == 0


def hold_stream(router, session: str):
    """A stream opened and read up to its first content, then held open (its slot stays taken)."""
    client = httpx.Client(timeout=60)
    cm = client.stream("POST", f"{router.base}/v1/messages", json=body(session, stream=True))
    r = cm.__enter__()
    lines = r.iter_lines()
    for line in lines:
        if "content_block_delta" in line:
            break
    r.lines = lines  # (kept: a collected iterator would close the stream)
    return client, cm, r


def test_a_busy_endpoint_is_skipped_without_blame(mock, start_router, tmp_path):
    mock.fault("a", event_gap_ms=300, words=60)  # a's streams last long
    router = start(start_router, mock, tmp_path, a="max_concurrency: 1")
    client, cm, held = hold_stream(router, str(uuid.uuid4()))
    try:
        assert held.headers["x-used-endpoint"] == "a"  # the first new conversation: a
        assert until(lambda: status(router)["a"]["in_flight"] == 1)
        with httpx.Client() as c:
            r = send(c, router, str(uuid.uuid4()))
        assert r.headers["x-used-endpoint"] == "b"
        assert r.headers["x-router-attempts"] == "a:busy, b:200"
        st = status(router)
        assert st["a"]["failures"] == 0 and st["a"]["state"] == "healthy"
        assert st["a"]["max_concurrency"] == 1 and st["b"]["max_concurrency"] is None
    finally:
        cm.__exit__(None, None, None)
        client.close()
    assert until(lambda: status(router)["a"]["in_flight"] == 0)


def test_in_flight_counts_come_back_to_zero_after_errors_and_clients_that_leave(mock, start_router, tmp_path):
    router = start(start_router, mock, tmp_path, a="max_concurrency: 2", b="max_concurrency: 2")
    with httpx.Client() as c:
        # upstream errors: a refuses, b's streams break mid-way, then both fail
        mock.fault("a", status=500)
        assert send(c, router, str(uuid.uuid4())).status_code == 200
        mock.fault("a")
        mock.fault("b", reset="mid_stream", reset_after_events=3)
        for _ in range(4):
            with c.stream("POST", f"{router.base}/v1/messages", json=body(str(uuid.uuid4()), stream=True)) as r:
                r.read()
        mock.fault("b")
        mock.fault("a", status=529)
        mock.fault("b", status=529)
        assert c.post(f"{router.base}/v1/messages", json=body(str(uuid.uuid4())), timeout=30).status_code == 529
        mock.fault("a")
        mock.fault("b")
    # clients that go away: mid-stream, and before the answer's head
    mock.fault("a", event_gap_ms=200, words=50)
    mock.fault("b", event_gap_ms=200, words=50)
    for _ in range(3):
        client, cm, held = hold_stream(router, str(uuid.uuid4()))
        assert status(router)[held.headers["x-used-endpoint"]]["in_flight"] == 1
        cm.__exit__(None, None, None)
        client.close()
    mock.fault("a", delay_ms=3000)
    mock.fault("b", delay_ms=3000)
    for _ in range(2):
        try:
            httpx.post(f"{router.base}/v1/messages", json=body(str(uuid.uuid4())), timeout=0.5)
        except httpx.TimeoutException:
            pass
    until(lambda: mock.inflight()["now"] == {})
    st = settled(router)
    assert set(st) == {"a", "b"}
    mock.fault("a")
    mock.fault("b")
    with httpx.Client() as c:  # and the full caps are there again
        assert Counter(send(c, router, str(uuid.uuid4())).headers["x-used-endpoint"] for _ in range(4))["a"] >= 1


def test_with_every_endpoint_at_its_cap_a_request_waits_for_the_first_free_slot(mock, start_router, tmp_path):
    mock.fault("a", event_gap_ms=300, words=60)
    mock.fault("b", event_gap_ms=300, words=60)
    router = start(start_router, mock, tmp_path, a="max_concurrency: 1", b="max_concurrency: 1")
    held = [hold_stream(router, str(uuid.uuid4())) for _ in range(2)]
    assert {h[2].headers["x-used-endpoint"] for h in held} == {"a", "b"}
    mock.fault("a")
    mock.fault("b")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: httpx.post(f"{router.base}/v1/messages", json=body(str(uuid.uuid4())),
                                                 timeout=60))
        try:  # a client that gives up while it waits takes no slot with it
            httpx.post(f"{router.base}/v1/messages", json=body(str(uuid.uuid4())), timeout=0.5)
        except httpx.TimeoutException:
            pass
        assert not waiting.done() and mock.count("a") + mock.count("b") == 2
        on_b = next(h for h in held if h[2].headers["x-used-endpoint"] == "b")
        on_b[1].__exit__(None, None, None)  # b's stream ends: its slot goes to the waiting request
        r = waiting.result()
    assert r.status_code == 200
    assert (r.headers["x-used-endpoint"], r.headers["x-router-attempts"]) == ("b", "b:200")
    for client, cm, _ in held:
        cm.__exit__(None, None, None)
        client.close()
    st = settled(router)
    assert st["a"]["failures"] == st["b"]["failures"] == 0
