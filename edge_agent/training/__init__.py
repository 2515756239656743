"""Local training: the agent's private data (JSONL, tokenization), LoRA adapters, the
training loop and evaluation. It may import `protocol` and `edge_agent.errors`; never
`aggregator`. The aggregator may import it (FedBiOT's server trains like an agent).
"""
