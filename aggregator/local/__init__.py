"""The local job (`edgefed-aggregator local`): a whole federated run on one machine, with or
without regional tiers, its demo data, its options and the table it prints. It sits on
top: it may import every other part of `aggregator` and `protocol`; nothing imports it
but the CLI.
"""
