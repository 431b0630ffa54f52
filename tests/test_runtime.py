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


def limits(monkeypatch, soft, hard, refuse=False):
    """Fake RLIMIT_NOFILE at (soft, hard); returns the list of limits set."""
    import resource
    set_to = []

    def setrlimit(which, value):
        if refuse:
            raise ValueError("not allowed")
        set_to.append(value)

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    return set_to


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(monkeypatch):
    set_to = limits(monkeypatch, 1024, 524288)
    assert runtime.raise_fd_limit() == (1024, 524288)
    assert set_to == [(524288, 524288)]


def test_an_unlimited_hard_limit_raises_the_soft_one_to_the_kernels_ceiling(monkeypatch):
    import resource
    set_to = limits(monkeypatch, 1024, resource.RLIM_INFINITY)
    monkeypatch.setattr(runtime, "_nr_open", lambda: 65536)
    assert runtime.raise_fd_limit() == (1024, 65536)
    assert set_to == [(65536, resource.RLIM_INFINITY)]


def test_a_limit_already_high_or_not_raisable_is_left_alone(monkeypatch):
    set_to = limits(monkeypatch, 20000, 20000)
    assert runtime.raise_fd_limit() == (20000, 20000) and set_to == []
    limits(monkeypatch, 1024, 4096, refuse=True)
    assert runtime.raise_fd_limit() == (1024, 1024)


def test_a_second_router_leaves_the_first_ones_handler_in_place():
    loop = FakeLoop()
    first, second = runtime.AcceptErrors(), runtime.AcceptErrors()
    first.install(loop)
    second.install(loop)  # a reloaded script: no wrapper around a wrapper
    assert loop.handler == first.handle
