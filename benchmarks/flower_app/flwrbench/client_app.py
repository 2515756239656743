"""ClientApp: answers every train message with fixed LoRA-shaped arrays; no training."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwrbench.payload import make_record, read_shapes

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with this node's update for the round: same shapes as the global arrays."""
    shapes = read_shapes(str(context.run_config["shapes-file"]))
    server_round = int(msg.content["config"]["server-round"])
    seed = (int(context.node_id) % (2**31)) * 1000 + server_round
    content = RecordDict(
        {
            "arrays": make_record(shapes, seed),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content=content, reply_to=msg)
