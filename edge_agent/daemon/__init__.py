"""The agent daemon: its config, the machine profile, the DEALER link (handshake,
heartbeats, upload grants), the durable outbox, the worker thread that runs client
methods, the workspace it lends them and the object store. It may import `protocol`,
`edge_agent.errors`, `edge_agent.model`, `edge_agent.training` and the method interface
of `edge_agent.methods`; never `aggregator`.
"""
