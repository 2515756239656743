"""What secure aggregation costs per round, against the plain protocol, at 3, 10 and 100 agents.

Run: ``python benchmarks/secagg_cost.py [--quick]``. In-process light agents: every agent and
the aggregator run the real halves (:mod:`edge_agent.privacy.secagg`, :mod:`aggregator.privacy.secagg`) on a
LoRA-sized update, and every message is encoded with :func:`protocol.frames.encode` exactly as
the wrappers build it (the same ``params["secagg"]`` entries and blobs), so the byte counts are
those on the wire (before CURVE's 16-byte box per frame). Times are CPU seconds of the work
itself, one process, no network: per agent (its stages summed) and for the aggregator (routing
plus unmasking). Secure aggregation also adds three round trips (advertise, share, unmask) that
a real link pays in latency.

The update is SmolLM2-135M's fedit adapter at r=8 on q_proj and v_proj (460,800 float32
values); ``--quick`` uses its first two layers (30,720 values) and 3 and 10 agents. One row at the largest count has
10% of the agents drop after sharing (the aggregator then rebuilds their pairwise masks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.privacy.secagg import SecAggServer
from edge_agent.privacy.secagg import SecAggClient
from protocol.frames import encode, frames_nbytes
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.payloads import decode, encode_lora
from protocol.secagg import wire
from protocol.secagg.shapes import (
    SecAggConfig,
    advert_to_params,
    request_to_params,
    roster_to_params,
    sealed_to_params,
)

MODEL = BaseModelRef(name="smollm2-135m", sha256="ab" * 32)
LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8


def lora_state(layers: int) -> dict[str, torch.Tensor]:
    """SmolLM2-135M's fedit adapter (r=8 on q_proj and v_proj) over its first ``layers``."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        for proj, out in (("q_proj", HIDDEN), ("v_proj", KV)):
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{p}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) * 0.02
            state[f"{p}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.02
    return state


def _assign(round: int, params: dict[str, object], blobs: dict[str, bytes] | None = None) -> int:
    header = TaskAssign(
        task_id="r1-score-x", round=round, method="fedit", model=MODEL, params=params
    )
    return frames_nbytes(encode(header, blobs or {}))


def _result(agent: str, blobs: dict[str, bytes], kind: str = "train") -> int:
    header = TaskResult(task_id="r1-train-x", round=1, agent_id=agent, method="fedit", kind=kind,  # type: ignore[arg-type]
                        num_examples=64, metrics={"train_loss": 1.0})  # fmt: skip
    return frames_nbytes(encode(header, blobs))


def plain_round(n: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
    up, agent_s, server_s = 0, 0.0, 0.0
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    for i in range(n):
        t0 = time.process_time()
        blob = encode_lora(state, method="fedit", round=1)
        agent_s += time.process_time() - t0
        up += _result(f"agent-{i:03d}", {"update": blob})
        t0 = time.process_time()
        for k, v in decode(blob).tensors.items():
            total[k] += v.double() * 64
        server_s += time.process_time() - t0
    down = _assign(1, {"lora": {"r": RANK}})
    return {"up": up / n, "down": down, "agent_s": agent_s / n, "server_s": server_s}


def secure_round(n: int, state: dict[str, torch.Tensor], drop: float = 0.0) -> dict[str, float]:
    config = SecAggConfig(degree=8, clip_range=64.0)
    ids = [f"agent-{i:03d}" for i in range(n)]
    dropped = set(ids[: int(drop * n)])
    ctx = "r1-0123456789abcdef"
    base = {"stage": "", "agent": "", "context": ctx, "config": config.model_dump(mode="json")}
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    agent_s = dict.fromkeys(ids, 0.0)
    server_s = 0.0
    layout = sorted((k, tuple(v.shape)) for k, v in state.items())
    vector = np.concatenate([state[k].double().numpy().reshape(-1) for k, _ in layout])

    def timed(agent: str, fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.process_time()
        out = fn(*args)
        agent_s[agent] += time.process_time() - t0
        return out

    server = SecAggServer(ctx, config, graph_seed=7)
    clients = {a: SecAggClient(a, ctx, config) for a in ids}
    for a in ids:
        down[a] += _assign(1, {wire.PARAM: {**base, "stage": "advertise", "agent": a}})
        advert = timed(a, clients[a].advertise)
        up[a] += _result(a, {wire.BLOB: wire.dump_json(advert_to_params(advert))}, "score")
        t0 = time.process_time()
        server.on_advert(a, advert)
        server_s += time.process_time() - t0
    t0 = time.process_time()
    rosters = server.rosters()
    server_s += time.process_time() - t0
    for a in ids:
        entry = {**base, "stage": "share", "agent": a, "roster": roster_to_params(rosters[a])}
        down[a] += _assign(1, {wire.PARAM: entry})
        sealed = timed(a, clients[a].share, rosters[a])
        up[a] += _result(
            a, {wire.BLOB: wire.dump_json({"sealed": sealed_to_params(sealed)})}, "score"
        )
        t0 = time.process_time()
        server.on_shares(a, sealed)
        server_s += time.process_time() - t0
    t0 = time.process_time()
    inboxes = server.inboxes()
    server_s += time.process_time() - t0
    for a in ids:
        entry = {**base, "stage": "mask", "agent": a, "inbox": sealed_to_params(inboxes[a])}
        down[a] += _assign(1, {"lora": {"r": RANK}, wire.PARAM: entry}) - _assign(
            1, {"lora": {"r": RANK}}
        )
        if a in dropped:
            continue
        masked = timed(a, clients[a].mask, inboxes[a], vector, 64)
        up[a] += _result(
            a,
            {
                wire.MASKED_BLOB: wire.vector_bytes(masked),
                wire.LAYOUT_BLOB: wire.layout_blob(wire.Layout(layout)),
            },
        )
        t0 = time.process_time()
        server.on_masked(a, masked)
        server_s += time.process_time() - t0
    t0 = time.process_time()
    request = server.unmask_request()
    server_s += time.process_time() - t0
    for a in request.survivors:
        down[a] += _assign(
            1,
            {
                wire.PARAM: {
                    **base,
                    "stage": "unmask",
                    "agent": a,
                    "request": request_to_params(request),
                }
            },
        )
        revealed = timed(a, clients[a].unmask, request)
        up[a] += _result(
            a, {wire.BLOB: wire.dump_json({"revealed": sealed_to_params(revealed)})}, "score"
        )
        t0 = time.process_time()
        server.on_revealed(a, revealed)
        server_s += time.process_time() - t0
    t0 = time.process_time()
    total = server.finish()
    server_s += time.process_time() - t0
    expected = vector * 64 * len(request.survivors)
    error = float(np.max(np.abs(total - expected)))
    live = [a for a in ids if a not in dropped]
    plain_down = _assign(1, {"lora": {"r": RANK}})
    return {
        "up": statistics.mean(up[a] for a in live),
        "down": plain_down + statistics.mean(down[a] for a in live),
        "agent_s": statistics.mean(agent_s[a] for a in live),
        "server_s": server_s,
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    state = lora_state(2 if args.quick else LAYERS)
    counts = (3, 10) if args.quick else (3, 10, 100)
    values = sum(v.numel() for v in state.values())
    print(
        f"update: {values:,} float32 values ({values * 4 / 1e6:.2f} MB); secagg degree 8, 64-bit ring"
    )
    print(f"{'agents':>6} {'drop':>5} {'up B/agent plain':>16} {'secagg':>10} {'x':>5} "
          f"{'down B/agent plain':>18} {'secagg':>9} {'agent s plain':>13} {'secagg':>7} "
          f"{'aggregator s plain':>18} {'secagg':>7} {'max |err|':>9}")  # fmt: skip
    rows = [(n, 0.0) for n in counts] + [(counts[-1], 0.1)]
    for n, drop in rows:
        p = plain_round(n, state)
        s = secure_round(n, state, drop)
        print(
            f"{n:>6} {drop:>5.0%} {p['up']:>16,.0f} {s['up']:>10,.0f} {s['up'] / p['up']:>5.2f} "
            f"{p['down']:>18,.0f} {s['down']:>9,.0f} {p['agent_s']:>13.4f} {s['agent_s']:>7.4f} "
            f"{p['server_s']:>18.4f} {s['server_s']:>7.4f} {s['error']:>9.2e}",
            flush=True,
        )
    print("secagg rows: the four stages' messages; error: unmasked sum vs float64 sum (weight 64)")
    print("down: task headers only; the global adapter both protocols send on top is left out")


if __name__ == "__main__":
    main()
