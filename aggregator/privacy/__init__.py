"""Per-run privacy on the aggregator's side: secure aggregation (SecAgg+) and client-level DP.

Owns the server halves that wrap a run's method as its ``[privacy]`` section asks
(:mod:`.wrap`), the section's schema (:mod:`.config`), the SecAgg+ unmasking state
(:mod:`.secagg`, :mod:`.secagg_method`) and DP noise and accounting (:mod:`.dp`,
:mod:`.dp_method`). May import ``protocol`` (``protocol.secagg`` holds the shared math),
``aggregator.methods`` and ``aggregator.errors``; never the engine or the service.
"""
