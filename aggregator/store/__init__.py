"""Durable state: the SQLite ledger (and its schema), the checkpoints of the methods' global
state, the export of the result (PEFT adapter, merged model) and the base model's hash.
It may import `protocol` and `aggregator.errors` only; everything else may import it.
"""
