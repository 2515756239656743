"""Real data for runs and the scoreboard: Natural Instructions v1 read out of the ``bigbench``
source archive (:mod:`.natural_instructions`), split across agents by task or Dirichlet
(:mod:`.split`), and the ``edgefed-aggregator data`` commands (:mod:`.cli`). May import
``protocol`` and ``edge_agent.training`` (the agent's data format); never the engine.
"""
