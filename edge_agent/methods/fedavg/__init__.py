"""FedAvg (full-parameter, dense update up and down): its client half (what an agent runs for a
task). The files of this folder are named for their roles; the registry imports `Client` from
here. It may import `protocol`, `edge_agent.errors`, `edge_agent.training`, `edge_agent.model`,
`edge_agent.daemon` and `edge_agent.methods`' interface; never `aggregator`.
"""

from edge_agent.methods.fedavg.client import Client

__all__ = ["Client"]
