"""The operator's tools: the aggregator's config file, the CURVE allow-list authenticator
and the report read from a run's ledger. It may import `protocol`, `aggregator.errors`
and `aggregator.store`.
"""
