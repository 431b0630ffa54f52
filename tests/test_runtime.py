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
