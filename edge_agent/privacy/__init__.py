"""Per-run privacy on the agent's side: SecAgg+ masking and local DP noise.

Owns the client wrapper that masks a method's update (:mod:`.secagg_method`), the SecAgg+
client state (:mod:`.secagg`) and update clipping and noise (:mod:`.dp`). May import
``protocol`` and ``edge_agent.methods``/``edge_agent.errors``; never the daemon.
"""
