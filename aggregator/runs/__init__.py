"""The runs of a long-lived ``serve``: their states in the ledger, the queue, the admin channel.

Owns each run's lifecycle (:mod:`.state`: queued, running, finished, failed, stopped), which run
the service runs now and what it waits for (:mod:`.lifecycle`), the authenticated admin socket
(:mod:`.admin`, :mod:`.admin_client`) and the ``runs`` commands (:mod:`.cli`). May import
``protocol``, ``aggregator.store`` and ``aggregator.ops``; the engine's service imports it,
not the other way round (``.admin_client`` imports nothing heavy, so ``runs list`` starts fast).
"""
