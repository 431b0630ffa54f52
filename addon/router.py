"""mitmproxy entry point: `mitmdump -s addon/router.py --set router_endpoints=NAME=URL ...`.

A thin shim: the router lives in the importable package `claude_router` beside this file.
"""

from claude_router.addon import Router

addons = [Router()]
