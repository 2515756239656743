"""The regional tier (`edgefed-aggregator region`): an aggregator toward its own agents and
an agent toward its upstream, and the relays that fold its agents' updates into one. It
may import `protocol`, `aggregator.engine`, `aggregator.store`, `aggregator.ops`,
`aggregator.methods` (the interface and a method's own relay half) and the agent's daemon
and method interface in `edge_agent` (a region is an agent toward its upstream).
"""
