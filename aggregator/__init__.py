"""The edgefed aggregator service: rounds, aggregation, ledger, checkpoints, export."""
