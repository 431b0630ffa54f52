"""Plain mitmproxy plus the router's hook index (``claude_router.dispatch``) and nothing else.

The benchmarks run it as ``mitmdump -s scripts/hook_index.py`` beside plain mitmdump and the
router: the router indexes mitmproxy's hook dispatch, which makes every event cheaper, so
"router vs mitmdump" alone would hide what the router's own work costs. Against this target
it shows.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))

from claude_router.dispatch import HookIndex  # noqa: E402
from mitmproxy import ctx  # noqa: E402


class Index:
    def running(self) -> None:
        HookIndex.install(ctx.master.addons)


addons = [Index()]
