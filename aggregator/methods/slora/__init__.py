"""SLoRA (a sparse stage under seeded masks, then LoRA from the SVD of its update): its server half
(assign, validate, fold, state). The files of this folder are named for their roles; the
registry imports `Server` from here. It may import `protocol`, `aggregator.errors`,
`aggregator.store`, `aggregator.ops` (the config), `aggregator.methods` (the interface, the
robust rules, another method's server half), `aggregator.tier.relay` (for a relay half), and the
agent's `edge_agent.training` and `edge_agent.daemon.objects` (a server that trains or keeps
objects like an agent); never `aggregator.engine`.
"""

from aggregator.methods.slora.server import Server

__all__ = ["Server"]
