import gc

from claude_router import runtime


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        runtime.tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (runtime.GEN0_THRESHOLD, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_tune_gc_leaves_collection_off_when_it_is_off():
    before = gc.get_threshold()
    try:
        gc.set_threshold(0)
        runtime.tune_gc()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
