"""Lightweight agents for the load harness: many DEALER sockets in one process, no training.

Run by ``benchmarks/load_harness.py`` as ``python benchmarks/_light_agents.py --endpoint E
--first I --count K --workload W``. Each agent speaks the real protocol over its own socket
(Hello, heartbeats, answers to every task, Ack bookkeeping) from one poll loop; a train task is
answered at once with an update of the workload's real size and kind, an eval task with
metrics. When every agent got Bye (or ``--timeout`` passes) it prints one JSON line of counts
and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator_throughput import PROFILE, SHA, ferret_workload, lora_workload

from protocol.frames import decode, encode, frames_nbytes
from protocol.messages import (
    Ack,
    Bye,
    ErrorReply,
    Grant,
    Heartbeat,
    Hello,
    TaskAssign,
    TaskResult,
    Welcome,
)


@dataclass
class Agent:
    agent_id: str
    index: int
    socket: zmq.Socket[bytes]
    interval: float = 1.0
    next_beat: float = 0.0
    welcomed: bool = False
    done: bool = False
    grant_above: int | None = None
    waiting: dict[str, list[object]] = field(default_factory=dict)
    """Large results announced in heartbeats, sent when the aggregator grants them."""
    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--workload", choices=["lora", "ferret"], default="lora")
    ap.add_argument("--ferret-model", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    workload = (
        lora_workload(8, "qkvo") if args.workload == "lora" else ferret_workload(args.ferret_model)
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    poller = zmq.Poller()
    agents: dict[zmq.Socket[bytes], Agent] = {}
    for i in range(args.first, args.first + args.count):
        sock = ctx.socket(zmq.DEALER)
        agent_id = f"agent-{i:04d}"
        sock.setsockopt(zmq.ROUTING_ID, agent_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(args.endpoint)
        agents[sock] = Agent(agent_id, i, sock)
        poller.register(sock, zmq.POLLIN)
        hello = Hello(agent_id=agent_id, versions=[1], profile=PROFILE, models=[SHA],
                      methods=[workload.method])  # fmt: skip
        sock.send_multipart(encode(hello), copy=False)
    blobs: dict[tuple[int, int], bytes] = {}
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and not all(a.done for a in agents.values()):
        now = time.monotonic()
        for a in agents.values():
            if a.welcomed and not a.done and now >= a.next_beat:
                beat = Heartbeat(state="idle", ready=list(a.waiting)[:64])
                a.socket.send_multipart(encode(beat), copy=False)
                a.next_beat = now + a.interval
        for sock, _ in poller.poll(100):
            a = agents[sock]
            msg = decode(sock.recv_multipart(copy=False))
            h = msg.header
            if isinstance(h, Welcome):
                a.welcomed, a.interval = True, h.heartbeat_interval
                a.grant_above = h.grant_above
            elif isinstance(h, Grant):
                frames = a.waiting.pop(h.task_id, None)
                if frames is not None:
                    sock.send_multipart(frames, copy=False)
            elif isinstance(h, TaskAssign):
                result_blobs: dict[str, bytes] = {}
                if h.kind == "train":
                    key = (a.index, h.round)
                    if key not in blobs:
                        blobs.clear()  # keep one round's blobs at most
                        blobs[key] = workload.make_blob(a.index, h.round)
                    result_blobs = {"update": blobs[key]}
                    metrics = {"train_loss": 1.0}
                else:
                    metrics = {"eval_loss": 1.0, "eval_em": 0.0}
                res = TaskResult(
                    run_id=h.run_id, round=h.round, task_id=h.task_id, agent_id=a.agent_id,
                    method=h.method, kind=h.kind, num_examples=10 + a.index % 7, metrics=metrics,
                )  # fmt: skip
                frames = encode(res, result_blobs)
                if a.grant_above is not None and frames_nbytes(frames) > a.grant_above:
                    a.waiting[h.task_id] = list(frames)
                    a.next_beat = 0.0  # announce it now
                else:
                    sock.send_multipart(frames, copy=False)
                if h.kind == "train":
                    a.sent.add(h.task_id)
            elif isinstance(h, Ack):
                a.waiting.pop(h.task_id, None)
                if h.accepted:
                    a.acked.add(h.task_id)
            elif isinstance(h, ErrorReply):
                a.errors.append(f"{h.code}: {h.reason}")
            elif isinstance(h, Bye):
                a.done = True
    out = {
        "agents": len(agents),
        "updates_sent": sum(len(a.sent) for a in agents.values()),
        "updates_acked": sum(len(a.sent & a.acked) for a in agents.values()),
        "errors": [e for a in agents.values() for e in a.errors][:10],
        "finished": sum(a.done for a in agents.values()),
    }
    print(json.dumps(out), flush=True)
    for sock in agents:
        sock.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
