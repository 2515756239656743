"""ServerApp: FedAvg for N rounds with training only, timestamps of each round to a JSON file.

Per round it records (``time.time()``, shared with the benchmark process on the same host):
``configured`` when the nodes are sampled and the train messages built, ``replies`` when all
replies are in, ``aggregated`` when FedAvg has averaged them. The round's time is
``aggregated - configured``: sending the global arrays, the clients' replies, and averaging.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwrbench.payload import make_record, read_shapes

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that timestamps each round's fit phase and writes them to ``out_file``."""

    def __init__(self, out_file: str, num_clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.out_file = out_file
        self.rounds: list[dict[str, Any]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        start = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append(
            {
                "round": server_round,
                "start": start,
                "configured": time.time(),
                "nodes": len(messages),
            }
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = self.rounds[-1]
        entry["replies"] = time.time()
        entry["ok"] = sum(1 for m in replies if not m.has_error())
        result = super().aggregate_train(server_round, replies)
        entry["aggregated"] = time.time()
        self._write()
        return result

    def _write(self) -> None:
        Path(self.out_file).write_text(json.dumps({"rounds": self.rounds}))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of FedAvg rounds over the fixed arrays."""
    cfg = context.run_config
    shapes = read_shapes(str(cfg["shapes-file"]))
    strategy = TimedFedAvg(str(cfg["out-file"]), int(cfg["num-clients"]))
    strategy.start(
        grid=grid,
        initial_arrays=make_record(shapes, seed=7),
        num_rounds=int(cfg["num-server-rounds"]),
    )
