"""FedAvg (full-parameter, dense update up and down): its server half (assign, validate, fold,
state). The files of this folder are named for their roles; the registry imports `Server` from
here. Same import rules as the other method folders: never `aggregator.engine`.
"""

from aggregator.methods.fedavg.server import Server

__all__ = ["Server"]
