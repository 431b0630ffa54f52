"""Process-wide settings that suit a long-running proxy holding many streams.

Python's cyclic garbage collector stops the event loop while it runs, and a full collection
scans every tracked object: at a thousand held streams that is several hundred thousand
objects and a pause of a few hundred milliseconds in every stream. Two settings make it cheaper:

- ``gc.freeze()`` once start-up is done: the modules, mitmproxy's addons and options and the
  router's configuration live as long as the process, so no collection scans them again;
- a larger first-generation threshold: fewer, slightly longer young collections, and so fewer
  of the older ones that follow them. Garbage in cycles is still collected, a little later.
"""

import gc
import logging

log = logging.getLogger("claude_router")

GEN0_THRESHOLD = 10_000  # CPython's default is 700 (2,000 from 3.13 on some builds)


_tuned = False


def tune_gc() -> None:
    """Once per process (a second router, or a reloaded script, must not freeze live flows)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0:  # 0: collection is off; leave it so
        gc.set_threshold(max(gen0, GEN0_THRESHOLD), gen1, gen2)
    log.debug(f"router: {gc.get_freeze_count()} start-up objects frozen; gc thresholds "
              f"{gc.get_threshold()}")
