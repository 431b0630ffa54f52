"""mitmproxy scripts the benchmarks load with ``mitmdump -s FILE`` (by path, never imported):
``hook_index.py`` (plain mitmproxy plus the router's hook index) and ``loopmon.py`` (event-loop
stall and gc timing)."""
