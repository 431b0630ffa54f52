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
