"""``python -m edge_agent``: the same as ``edgefed-agent``."""

from edge_agent.cli import main

main()
