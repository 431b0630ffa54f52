"""The router's commands, each a module with ``main()`` and a ``[project.scripts]`` entry point:

    claude-router-workers   workers.py  N routers behind HAProxy (``./scripts/run --workers N``)
    claude-router-status    status.py   the endpoints as a table; commands through Redis (``./scripts/status``)
    claude-router-usage     usage.py    spend from the ledger (``./scripts/usage``)

``python -m claude_router.cli.NAME`` runs each as well (the launchers in ``scripts/`` do).
"""

import os
import sys


def prog(name: str) -> str:
    """argparse's ``prog``: the command as it was typed, or ``name`` under ``python -m`` (whose
    argv[0] is the module's file)."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if not typed or typed.endswith(".py") else typed
