import gc

import pytest

from claude_router import runtime


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    before = gc.get_threshold()
    monkeypatch.setattr(runtime, "_tuned", False)
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold():
    gc.set_threshold(700, 10, 10)
    runtime.tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (runtime.GEN0_THRESHOLD, 10, 10)


def test_tune_gc_leaves_collection_off_when_it_is_off():
    gc.set_threshold(0)
    runtime.tune_gc()
    assert gc.get_threshold()[0] == 0


def test_tune_gc_runs_once_per_process():
    runtime.tune_gc()
    gc.unfreeze()
    runtime.tune_gc()  # a second router: live flows are not frozen
    assert gc.get_freeze_count() == 0


class FakeLoop:
    def __init__(self) -> None:
        self.handler = None
        self.default = []

    def get_exception_handler(self):
        return self.handler

    def set_exception_handler(self, handler) -> None:
        self.handler = handler

    def default_exception_handler(self, context) -> None:
        self.default.append(context)


def accept_failure() -> dict:
    return {"message": runtime.ACCEPT_ERROR, "exception": OSError(24, "Too many open files")}


def test_failed_accepts_become_one_warning_per_period(caplog):
    now = [0.0]
    loop, seen = FakeLoop(), []
    loop.handler = lambda lp, ctx: seen.append(ctx)  # mitmproxy's: a traceback per report
    quiet = runtime.AcceptErrors(every=10, clock=lambda: now[0])
    quiet.install(loop)
    for _ in range(100):
        loop.handler(loop, accept_failure())
    now[0] = 10.0
    loop.handler(loop, accept_failure())
    warnings = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(warnings) == 2 and "Too many open files" in warnings[0]
    assert "99 failed accepts" not in warnings[0] and "100 failed accepts" in warnings[1]
    assert seen == []


def test_every_other_loop_error_reaches_the_handler_it_replaced():
    loop, seen = FakeLoop(), []
    loop.handler = previous = lambda lp, ctx: seen.append(ctx)
    quiet = runtime.AcceptErrors()
    quiet.install(loop)
    other = {"message": "Task exception was never retrieved", "exception": ValueError("x")}
    loop.handler(loop, other)
    assert seen == [other]
    quiet.uninstall()
    assert loop.handler is previous


def test_without_a_previous_handler_the_loops_default_reports_it():
    loop = FakeLoop()
    runtime.AcceptErrors().install(loop)
    loop.handler(loop, {"message": "boom"})
    assert loop.default == [{"message": "boom"}]
