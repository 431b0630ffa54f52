from claude_router.endpoints import parse_endpoints
from claude_router.health import HEALTHY, Breaker, Health, after_failure
from claude_router.policy import Attempt, all_failed_message, attempts_header, fallback, plan

EPS = parse_endpoints(["aws=http://h/aws", "droid=http://h/droid", "ultra=http://h/ultra"])
B = Breaker(max_failures=3, cooldown=60)


def cooled(now=0.0) -> Health:
    h = HEALTHY
    for _ in range(3):
        h = after_failure(h, now, B)
    return h


def names(steps):
    return [(s.endpoint.name, s.probe) for s in steps]


def test_all_healthy_in_price_order():
    assert names(plan(EPS, {}, 0)) == [("aws", False), ("droid", False), ("ultra", False)]


def test_cooling_endpoint_is_skipped():
    assert names(plan(EPS, {"aws": cooled()}, 10)) == [("droid", False), ("ultra", False)]


def test_failing_but_not_ejected_is_still_tried_first():
    h = after_failure(HEALTHY, 0, B)
    assert names(plan(EPS, {"aws": h}, 0))[0] == ("aws", False)


def test_half_open_endpoint_needs_the_probe():
    assert names(plan(EPS, {"aws": cooled()}, 60))[0] == ("aws", True)


def test_nothing_usable_gives_empty_plan_and_fallback_tries_all():
    view = {ep.name: cooled() for ep in EPS}
    assert plan(EPS, view, 1) == []
    assert [s.endpoint.name for s in fallback(EPS)] == ["aws", "droid", "ultra"]


def test_attempts_header_format():
    attempts = [Attempt("aws", "529"), Attempt("droid", "refused"), Attempt("ultra", "200")]
    assert attempts_header(attempts) == "aws:529, droid:refused, ultra:200"


def test_all_failed_message_names_each_endpoint():
    msg = all_failed_message([Attempt("aws", "refused", "connection refused"), Attempt("b", "timeout")])
    assert msg == "every endpoint failed (aws: connection refused; b: timeout)"


# -- edges found by mutation testing (./scripts/mutation, docs/mutation.md) -------------------

from claude_router import policy  # noqa: E402


def test_a_pinned_tier_that_does_not_exist_keeps_the_price_order():
    assert [e.name for e in policy.pinned_order(EPS, "nope")] == ["aws", "droid", "ultra"]
    assert [e.name for e in policy.pinned_order(EPS, "droid")] == ["droid", "ultra", "aws"]


def test_the_fallback_never_probes():
    assert names(fallback(EPS)) == [("aws", False), ("droid", False), ("ultra", False)]


def test_health_subjects_are_each_endpoint_and_its_families():
    from claude_router.profiles import FAMILIES
    assert policy.health_subjects(["a"]) == ["a", *(f"a~{f}" for f in FAMILIES)]
    assert policy.is_credential_subject("a@k") and not policy.is_credential_subject("a~opus")


def test_a_key_cooling_at_an_endpoint_cools_it_for_that_key_only():
    view = {"aws@k1": cooled(0), "droid": Health(failures=2, ejections=0, probe_until=7.0)}
    mine = policy.with_credential(view, ["aws", "droid"], "k1", 1)
    assert names(plan(EPS, mine, 1)) == [("droid", False), ("ultra", False)]
    assert mine["aws"] == Health(failures=0, ejections=1, ejected_until=60)
    assert policy.with_credential(view, ["aws", "droid"], "k2", 1) is view


def test_a_scope_cooling_longer_keeps_the_endpoints_own_counts():
    own = Health(failures=2, ejections=3, ejected_until=10, probe_until=5)
    view = {"droid~opus": Health(ejections=1, ejected_until=100), "aws~opus": HEALTHY,
            "aws": HEALTHY, "droid": own}
    merged = policy.with_family(view, ["aws", "droid", "ultra"], "opus", 1)
    assert merged["droid"] == Health(failures=2, ejections=3, ejected_until=100, probe_until=5)
    assert merged["aws"] is HEALTHY and "ultra" not in merged
    same = {"droid~opus": Health(ejections=1, ejected_until=10), "droid": own}
    assert policy.with_family(same, ["droid"], "opus", 1) is same  # not longer: unchanged


def test_every_cooling_scope_is_merged_not_only_the_first():
    view = {"aws~opus": Health(ejections=1, ejected_until=50), "droid~opus": Health(ejections=1, ejected_until=70)}
    merged = policy.with_family(view, ["aws", "droid"], "opus", 1)
    assert (merged["aws"].ejected_until, merged["droid"].ejected_until) == (50, 70)
    assert view.keys() == {"aws~opus", "droid~opus"}  # the view itself is not changed
    later = {"aws~opus": HEALTHY, "droid~opus": Health(ejections=1, ejected_until=70)}
    assert policy.with_family(later, ["aws", "droid"], "opus", 1)["droid"].ejected_until == 70


def test_nothing_tried_says_so():
    assert all_failed_message([]) == "no endpoint was tried"


def test_skips_without_blame_are_neither_failures_nor_failovers():
    from claude_router import ledger_views, policy
    assert not any(policy.was_tried(o) for o in ("busy", "low_balance", "thinking_signature", "skipped:model"))
    assert all(policy.was_tried(o) for o in ("529", "reset", "timeout", "200", "client-key:429"))
    assert ledger_views.failed_attempts("aws:low_balance, droid:200", "droid") == []
    assert ledger_views.failed_attempts("aws:busy, bob:busy", None) == []
    assert ledger_views.failed_attempts("aws:529, droid:thinking_signature, droid:200", "droid") == ["aws"]
