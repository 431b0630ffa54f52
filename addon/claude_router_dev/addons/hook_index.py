"""Plain mitmproxy plus the router's hook index (``claude_router.dispatch``) and nothing else.
Installed as the router installs it (``compat.install_hook_index``): only on a mitmproxy whose
event dispatch is the verified one; elsewhere this is plain mitmdump, and says so at start.

The benchmarks run it as ``mitmdump -s addon/claude_router_dev/addons/hook_index.py`` beside
plain mitmdump and the router: the router indexes mitmproxy's hook dispatch, which makes every
event cheaper, so "router vs mitmdump" alone would hide what the router's own work costs.
Against this target it shows.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # addon/: this checkout's claude_router

from mitmproxy import ctx  # noqa: E402

from claude_router import compat  # noqa: E402


class Index:
    def running(self) -> None:
        if compat.install_hook_index(ctx.master.addons) is None:
            logging.getLogger("claude_router").warning(
                f"hook_index.py: no hook index on this mitmproxy ({compat.versions()})")


addons = [Index()]
