"""The base model on an edge server: the model store (resolve, hash, convert a .gguf),
loading with quantization, the model's files and the GGUF conversion cache. It may
import `protocol` and `edge_agent.errors`; never `aggregator`.
"""
