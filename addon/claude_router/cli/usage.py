"""``claude-router-usage`` (``./scripts/usage``): spend by client, day, endpoint and model, read
from the router's ledger. The report itself lives in ``claude_router.spend_report``."""

import sys

from claude_router.spend_report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
