"""SLoRA (a sparse stage under seeded masks, then LoRA from the SVD of its update): its client half
(what an agent runs for a task). The files of this folder are named for their roles; the
registry imports `Client` from here. It may import `protocol`, `edge_agent.errors`,
`edge_agent.training`, `edge_agent.model`, `edge_agent.daemon` (the workspace and object store
it is lent) and `edge_agent.methods`' interface; never `aggregator`.
"""

from edge_agent.methods.slora.client import Client

__all__ = ["Client"]
