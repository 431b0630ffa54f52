"""Named clients (issue 21), pure: the spec and its parser, who a key is, the calendar periods
budgets run over, the decision to admit or refuse, and the per-client accounts (injected clock)."""

from datetime import UTC, datetime

import pytest

from claude_router import clients, config
from claude_router.accounts import Accounts
from claude_router.clients import Budget, Client
from claude_router.config import ConfigError
from claude_router.usage import Usage

SECRET = "sk-alice-7f3e2d"
SRC = "router.yaml"


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-12-09T15:30:00")  # a Wednesday


def doc(*entries, **top) -> dict:
    return {"endpoints": [{"name": "aws", "url": "https://relay.example/aws"},
                          {"name": "droid", "url": "https://relay.example/droid"}],
            "clients": list(entries), **top}


def alice(**fields) -> dict:
    return {"name": "alice", "key": SECRET, **fields}


def refused(d: dict, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        config.parse(d, SRC, env or {})
    message = str(exc.value)
    assert SECRET not in message
    return message


# --- parsing ---

def test_a_full_client_parses():
    cfg = config.parse(doc(alice(budget={"usd": 20, "per": "day"}, rpm=60, max_concurrency=4,
                                 endpoints=["aws"])), SRC, {})
    assert cfg.clients == (Client("alice", SECRET.encode(), Budget(20.0, "day"), 60, 4, ("aws",)),)


def test_a_key_may_come_from_the_environment():
    cfg = config.parse(doc(alice(key="env:ALICE_KEY")), SRC, {"ALICE_KEY": "sk-from-env"})
    assert cfg.clients[0].key == b"sk-from-env"


def test_a_client_without_limits_is_not_limited():
    assert not config.parse(doc(alice()), SRC, {}).clients[0].limited


def test_admin_keys_parse():
    cfg = config.parse(doc(admin_keys=["env:ADMIN"]), SRC, {"ADMIN": "sk-admin"})
    assert cfg.admin_keys == ("sk-admin",)


def test_todays_client_keys_keep_working_beside_clients():
    cfg = config.parse(doc(alice(), client_keys=["sk-plain"]), SRC, {})
    assert cfg.client_keys == ("sk-plain",) and cfg.clients[0].name == "alice"


@pytest.mark.parametrize("name", ["Alice", "", "a b", "-x", "a" * 65, 7, None])
def test_a_bad_name_is_refused_naming_the_field(name):
    assert refused(doc(alice(name=name))).startswith(f"{SRC}: clients[0].name: ")


def test_a_name_used_twice_is_refused():
    assert "clients[1].name" in refused(doc(alice(), alice(key="sk-other")))


def test_two_clients_with_one_key_are_refused_without_showing_it():
    message = refused(doc(alice(), alice(name="bob")))
    assert message.startswith(f"{SRC}: clients[1] (bob).key: the same key as clients[0]")


def test_a_client_key_that_is_also_a_plain_client_key_is_refused():
    assert "clients[0] (alice).key: the same key as client_keys[0]" in refused(doc(alice(), client_keys=[SECRET]))


def test_a_client_key_that_is_also_an_admin_key_is_refused():
    assert "the same key as admin_keys[0]" in refused(doc(alice(), admin_keys=[SECRET]))


def test_a_missing_key_is_refused():
    assert "clients[0] (alice).key: is required" in refused(doc({"name": "alice"}))


def test_an_unset_environment_key_is_refused_naming_the_variable():
    assert "environment variable NOPE is not set" in refused(doc(alice(key="env:NOPE")))


def test_a_key_with_a_newline_is_refused_without_showing_it():
    assert "clients[0] (alice).key: contains a control character" in refused(doc(alice(key=SECRET + "\n")))


@pytest.mark.parametrize("budget", [{"usd": 20}, {"usd": -1, "per": "day"}, {"usd": "20", "per": "day"},
                                    {"usd": True, "per": "day"}, {"usd": float("nan"), "per": "day"},
                                    {"usd": 20, "per": "hour"}, 20])
def test_a_bad_budget_is_refused(budget):
    assert "clients[0] (alice).budget" in refused(doc(alice(budget=budget)))


@pytest.mark.parametrize("field", ["rpm", "max_concurrency"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True])
def test_a_bad_count_is_refused(field, value):
    assert f"clients[0] (alice).{field}: must be a whole number" in refused(doc(alice(**{field: value})))


def test_an_allow_list_must_name_endpoints():
    assert "clients[0] (alice).endpoints: no endpoint 'ultra'" in refused(doc(alice(endpoints=["ultra"])))


def test_an_empty_allow_list_is_refused():
    assert "clients[0] (alice).endpoints" in refused(doc(alice(endpoints=[])))


def test_an_unknown_field_is_refused():
    assert "clients[0].budgets: unknown field" in refused(doc(alice(budgets=1)))


def test_clients_must_be_a_list():
    assert f"{SRC}: clients: expected a list" in refused({**doc(), "clients": {"alice": 1}})


def test_the_repr_never_shows_the_key():
    assert SECRET not in repr(Client("alice", SECRET.encode()))


# --- who a key is ---

TABLE = clients.table([Client("alice", b"ka"), Client("bob", b"kb")], [b"plain"])


def test_a_named_key_is_its_client():
    assert clients.identify(b"kb", TABLE).name == "bob"


def test_a_plain_key_is_an_unnamed_client():
    c = clients.identify(b"plain", TABLE)
    assert c.name is None and c.label == clients.UNNAMED and not c.limited


def test_an_unknown_key_is_nobody():
    assert clients.identify(b"kc", TABLE) is None


def test_a_prefix_of_a_key_is_nobody():
    assert clients.identify(b"k", TABLE) is None


# --- calendar periods ---

def test_a_day_starts_at_midnight_utc():
    assert clients.period_start("day", NOW) == ts("2026-12-09T00:00:00")


def test_a_day_resets_at_the_next_midnight():
    assert clients.period_end("day", NOW) == ts("2026-12-10T00:00:00")


def test_a_week_starts_on_monday():
    assert clients.period_start("week", NOW) == ts("2026-12-07T00:00:00")


def test_a_week_resets_on_the_next_monday():
    assert clients.period_end("week", NOW) == ts("2026-12-14T00:00:00")


def test_a_month_starts_on_the_first():
    assert clients.period_start("month", NOW) == ts("2026-12-01T00:00:00")


def test_december_resets_on_new_years_day():
    assert clients.period_end("month", NOW) == ts("2027-01-01T00:00:00")


def test_february_of_a_leap_year_has_29_days():
    assert clients.period_end("month", ts("2028-02-10T00:00:00")) == ts("2028-03-01T00:00:00")


def test_the_last_second_of_a_day_is_still_that_day():
    assert clients.day(ts("2026-12-09T23:59:59")) == "2026-12-09"


def test_the_days_of_a_week_so_far():
    assert clients.days_of("week", NOW) == ["2026-12-07", "2026-12-08", "2026-12-09"]


def test_the_days_of_a_day_are_today():
    assert clients.days_of("day", NOW) == ["2026-12-09"]


def test_a_monthly_period_sums_its_days():
    spend = {"2026-11-30": 5.0, "2026-12-01": 1.0, "2026-12-09": 2.0}
    assert clients.spent_in_period("month", NOW, spend) == 3.0


# --- decisions ---

def budgeted(usd=20.0, per="day", **kw) -> Client:
    return Client("alice", b"k", Budget(usd, per), **kw)


def test_under_budget_is_admitted():
    assert clients.decide(budgeted(), NOW, 19.99, [], 0) is None


def test_a_spent_budget_is_refused_naming_it_and_its_reset():
    r = clients.decide(budgeted(), NOW, 20.0, [], 0)
    assert r.reason == "budget"
    assert r.message == "alice: daily budget $20.00 spent; resets 00:00 UTC"


def test_a_spent_budget_waits_until_the_reset():
    assert clients.decide(budgeted(), NOW, 25.0, [], 0).retry_after == 8 * 3600 + 30 * 60


def test_a_spent_budget_tells_clients_not_to_retry():
    assert clients.decide(budgeted(), NOW, 25.0, [], 0).final


def test_a_spent_budget_just_before_the_reset_asks_for_a_short_retry():
    r = clients.decide(budgeted(), ts("2026-12-09T23:59:30"), 25.0, [], 0)
    assert r.retry_after == 30 and not r.final


def test_a_weekly_budget_names_its_reset_day():
    r = clients.decide(budgeted(5, "week"), NOW, 5.0, [], 0)
    assert r.message == "alice: weekly budget $5.00 spent; resets Monday 2026-12-14 00:00 UTC"


def test_a_monthly_budget_names_its_reset_date():
    r = clients.decide(budgeted(100, "month"), NOW, 100.0, [], 0)
    assert r.message == "alice: monthly budget $100.00 spent; resets 2027-01-01 00:00 UTC"


def test_a_zero_budget_refuses_everything():
    assert clients.decide(budgeted(0), NOW, 0.0, [], 0).reason == "budget"


def test_concurrency_at_the_cap_is_refused_briefly():
    r = clients.decide(Client("a", b"k", max_concurrency=2), NOW, 0, [], 2)
    assert r.reason == "concurrency" and 1 <= r.retry_after <= 60 and not r.final


def test_concurrency_under_the_cap_is_admitted():
    assert clients.decide(Client("a", b"k", max_concurrency=2), NOW, 0, [], 1) is None


def test_rpm_reached_is_refused_until_the_oldest_leaves_the_minute():
    r = clients.decide(Client("a", b"k", rpm=2), NOW, 0, [NOW - 50, NOW - 10], 0)
    assert r.reason == "rpm" and r.retry_after == 10


def test_rpm_counts_only_the_last_minute():
    assert clients.decide(Client("a", b"k", rpm=2), NOW, 0, [NOW - 61, NOW - 10], 0) is None


def test_rpm_retry_after_is_at_most_60_seconds():
    assert clients.decide(Client("a", b"k", rpm=1), NOW, 0, [NOW - 0.001], 0).retry_after <= 60


def test_the_budget_is_checked_before_the_rate():
    c = Client("a", b"k", Budget(1, "day"), rpm=1)
    assert clients.decide(c, NOW, 1.0, [NOW], 0).reason == "budget"


# --- accounts ---

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_spend_recorded_counts_against_the_budget():
    a = Accounts(Clock(NOW))
    c = budgeted(1.0)
    a.record("alice", NOW, "aws", "m", Usage(10, 10), 1.0)
    assert a.admit(c).reason == "budget"


def test_spend_of_yesterday_does_not_count_against_a_daily_budget():
    a = Accounts(Clock(NOW))
    a.record("alice", NOW - 86400, "aws", "m", Usage(), 5.0)
    assert a.admit(budgeted(1.0)) is None


def test_spend_of_yesterday_counts_against_a_weekly_budget():
    a = Accounts(Clock(NOW))
    a.record("alice", NOW - 86400, "aws", "m", Usage(), 5.0)
    assert a.admit(budgeted(1.0, "week")).reason == "budget"


def test_admitting_counts_a_request_in_flight_and_release_ends_it():
    a = Accounts(Clock(NOW))
    c = Client("a", b"k", max_concurrency=1)
    assert a.admit(c) is None
    assert a.admit(c).reason == "concurrency"
    a.release("a")
    assert a.admit(c) is None


def test_a_refused_request_is_not_in_flight():
    a = Accounts(Clock(NOW))
    c = Client("a", b"k", max_concurrency=1)
    a.admit(c)
    a.admit(c)
    assert a.get("a").in_flight == 1 and a.get("a").refused["concurrency"] == 1


def test_rpm_admits_again_after_a_minute():
    clock = Clock(NOW)
    a = Accounts(clock)
    c = Client("a", b"k", rpm=1)
    assert a.admit(c) is None
    a.release("a")
    clock.t += 30
    assert a.admit(c).reason == "rpm"
    clock.t += 31
    assert a.admit(c) is None


def test_release_never_goes_below_zero():
    a = Accounts(Clock(NOW))
    a.release("nobody")
    a.admit(Client("a", b"k"))
    a.release("a")
    a.release("a")
    assert a.get("a").in_flight == 0


def test_figures_show_spend_budget_remaining_and_reset():
    a = Accounts(Clock(NOW))
    a.record("alice", NOW, "aws", "claude-x", Usage(100, 20), 0.25)
    f = a.figures(budgeted(1.0))
    assert (f["client"], f["spent_usd"], f["budget_usd"], f["remaining_usd"], f["resets_at"]) == (
        "alice", 0.25, 1.0, 0.75, "2026-12-10T00:00:00Z")
    assert f["by_endpoint"]["aws"]["requests"] == 1 and f["by_model"]["claude-x"]["cost_usd"] == 0.25


def test_figures_of_one_client_hold_no_other_clients_spend():
    a = Accounts(Clock(NOW))
    a.record("bob", NOW, "aws", "m", Usage(), 3.0)
    assert a.figures(budgeted(1.0))["spent_usd"] == 0


def test_the_document_keeps_a_client_a_reload_removed():
    a = Accounts(Clock(NOW))
    a.record("carol", NOW, "aws", "m", Usage(), 1.0)
    names = [d["client"] for d in a.document([budgeted()])]
    assert names == ["alice", "carol"]


def test_shared_spend_from_redis_counts_when_larger():
    a = Accounts(Clock(NOW))
    a.record("alice", NOW, "aws", "m", Usage(), 0.5)
    a.get("alice").shared[clients.day(NOW)] = 3.0
    assert a.spent(budgeted(), NOW) == 3.0


def test_own_spend_counts_when_redis_forgot_it():
    a = Accounts(Clock(NOW))
    a.record("alice", NOW, "aws", "m", Usage(), 2.0)
    a.get("alice").shared[clients.day(NOW)] = 0.0
    assert a.spent(budgeted(), NOW) == 2.0


def test_tallies_per_day_are_bounded_however_many_models_clients_invent():
    a = Accounts(Clock(NOW))
    for i in range(500):
        a.record("alice", NOW, "aws", f"model-{i}", Usage(), 0.0)
    assert len(a.get("alice").tallies) <= 201


def test_old_days_are_pruned():
    a = Accounts(Clock(NOW))
    a.record("alice", NOW - 60 * 86400, "aws", "m", Usage(), 1.0)
    a.record("alice", NOW, "aws", "m2", Usage(), 1.0)
    assert all(d >= clients.day(NOW - 41 * 86400) for d, _, _ in a.get("alice").tallies)


def test_the_status_table_lists_the_clients():
    from claude_router.status import table
    a = Accounts(Clock(NOW))
    a.record("alice", NOW, "aws", "m", Usage(), 0.5)
    a.admit(budgeted(0.5))
    text = table({"store": "memory", "endpoints": [], "clients": a.document([budgeted(1.0)])})
    line = next(line for line in text.splitlines() if line.startswith("alice"))
    assert line.split()[:5] == ["alice", "day", "0.5000", "1.0000", "0.5000"]
    assert "budget:1" in line


def test_the_status_table_has_no_clients_part_without_clients():
    from claude_router.status import table
    assert "client" not in table({"store": "memory", "endpoints": []})


def test_of_two_entries_with_one_key_the_first_is_the_client():
    table = (Client("alice", b"same"), Client(None, b"same"))
    assert clients.identify(b"same", table).name == "alice"


def test_a_new_table_is_looked_up_anew():
    first = clients.table([Client("alice", b"ka")], [])
    assert clients.identify(b"ka", first).name == "alice"
    second = clients.table([Client("carol", b"ka")], [])
    assert clients.identify(b"ka", second).name == "carol"
    assert clients.identify(b"ka", list(second)).name == "carol"  # a list: compared key by key
