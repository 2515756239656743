"""Aggregator receive throughput against a naive pickle baseline and raw loopback, in one run.

Run: ``python benchmarks/aggregator_throughput.py [--quick]``. N agents (one DEALER each) send
one update each per round to a ROUTER on 127.0.0.1, all at once (one sender thread queues every
agent's message without waiting for Acks: N agents that finish a round together, the moment
that loads an aggregator most), which handles them the way ``AggregatorService`` does: the
burst that has arrived is one group; per message ``protocol.frames.decode`` (blob lengths and
sha256; on a worker thread for large ones), then ``RoundEngine.on_message``: the method's
``validate`` (payload decode with its checks), a record (ledger row + payload) appended to the
round's update log; at the group's end one log sync, one ledger transaction, the updates added
to the running FedAvg sum, and the Acks sent back. The engine, ledger and checkpoint store are
the real ones (insecure, state dir in a temp dir); only the clock is fixed and the socket loop
is this file's, so the timing starts when the agents start sending and stops when the last
update is summed. Closing the round (mean, checkpoint save, and the method's background work
that follows it: Ferret's rebuild of the weights) is timed apart. The summary line gives the
updates per group commit (at most N: a round's updates) and every receiver's process CPU time
per update (all its threads, the sender's and ZeroMQ's I/O thread's included: on a shared
machine the work, apart from how much of the machine each receiver got).

Baseline: the same socket types carrying ``pickle.dumps`` of a dict of numpy arrays, unpickled
and summed into float64 accumulators (pickle only here, as the thing being measured; never in
the product). Raw: the same bytes as opaque frames, received and dropped.

Rows: ``edgefed`` as the service runs; ``no pipeline threads`` (decode, log writes and the sum
on the loop thread); for LoRA also ``log without O_DIRECT`` (large records through the page
cache) and, where the accumulator is summed on more than one helper (``--sum-helpers N``; the
service's default is one), ``summing on one helper``; for Ferret also ``last round's rebuild
running`` (the next round's updates taken while the previous round's rebuild, ~1 s of CPU here,
runs on its thread: what this benchmark measured before 2026-12-03's third pass; in a training
run agents train between rounds).

Each receiver runs in a process of its own (``--one``), one after another: repeats in one process
slowed down (the Ferret server's rebuild threads outlived their run), and a fresh process gives
each receiver the same start. edgefed's time is broken down by step (``frames.decode`` with its
sha256, the method's ``validate``, the blob writes, the syncs, the ledger, the sum), measured by
wrapping those calls; the rest is the socket loop and the engine's own bookkeeping. Steps shown
indented run on a helper thread with the pipeline (the record writes on the log's appender, the
summing on the accumulator's helper): their time overlaps the loop's. ``frames.decode`` runs on
the decode workers (one per core, at most 4); what is shown is the loop's wait for it.

Workloads: LoRA r=35 on q,k,v,o of SmolLM2-135M (16.1 MB of float32), and Ferret updates of
5 seeds (of K = 32) x the 212 groups of a small stand-in model with SmolLM2's names: 1,060
triples, 13 KB, the size the Ferret runs in docs/methods/ferret.md sent (690-995 triples).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.engine.engine import RoundEngine
from aggregator.methods import MethodContext, server_methods
from aggregator.ops.config import build_config
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol import payloads
from protocol.frames import decode, encode, frames_nbytes
from protocol.messages import BaseModelRef, Hello, Profile, TaskAssign, TaskResult
from protocol.methods.ferret import math as fm

SHA = "cd" * 32
MODEL = BaseModelRef(name="bench", sha256=SHA)
PROFILE = Profile(
    hostname="h", os="Linux", python="3.11", torch="2.13", cpus=2,
    ram_total=1 << 36, ram_available=1 << 35, disk_free=1 << 38,
)  # fmt: skip
LAYERS, HIDDEN, KV = 30, 576, 192
LORA_R, FERRET_K, FERRET_SEEDS = 35, 32, 5

Frames = list[Any]


class FixedClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lora_update(r: int, seed: int, targets: str = "qkvo") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    outs = {"q": HIDDEN, "k": KV, "v": KV, "o": HIDDEN}
    for layer in range(LAYERS):
        for m, out in ((m, outs[m]) for m in targets):
            p = f"base_model.model.model.layers.{layer}.self_attn.{m}_proj"
            state[f"{p}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=g) * 0.01
            state[f"{p}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.01
    return state


def stand_in_model(model_dir: Path) -> int:
    """A small model directory for the Ferret server (SmolLM2 names, hidden 64); its groups."""
    g = torch.Generator().manual_seed(3)
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(256, 64, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, shape in (
            ("input_layernorm", (64,)), ("post_attention_layernorm", (64,)),
            ("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
            ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128)),
        ):  # fmt: skip
            w[f"{p}.{name}.weight"] = torch.randn(*shape, generator=g)
    w["model.norm.weight"] = torch.ones(64)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file(w, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text('{"tie_word_embeddings": true}')
    return len(fm.build_layout({n: tuple(t.shape) for n, t in w.items()}).groups)


@dataclass
class Workload:
    name: str
    method: str
    method_cfg: dict[str, Any]
    model_dir: Path | None
    make_blob: Callable[[int, int], bytes]
    """(agent index, round) -> payload bytes."""
    make_tensors: Callable[[int], dict[str, np.ndarray]]
    """agent index -> the same numbers as numpy arrays, for the baseline."""


def lora_workload(r: int = LORA_R, targets: str = "qkvo") -> Workload:
    """LoRA factors of SmolLM2-135M's shapes; ``r=8, targets="qkvo"`` is fedit's default (3.69 MB)."""
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def tensors(i: int) -> dict[str, torch.Tensor]:
        if i not in cache:
            cache[i] = lora_update(r, i, targets)
        return cache[i]

    return Workload(
        name=f"LoRA r={r} on {','.join(targets)}",
        method="fedit",
        method_cfg={
            "lora": {"r": r, "alpha": 16.0, "target_modules": [f"{m}_proj" for m in targets]}
        },
        model_dir=None,
        make_blob=lambda i, rnd: payloads.encode_lora(tensors(i), method="fedit", round=rnd),
        make_tensors=lambda i: {k: v.numpy() for k, v in tensors(i).items()},
    )


def ferret_workload(model_dir: Path) -> Workload:
    groups = stand_in_model(model_dir)
    seed_cfg = 0

    def triples(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + i)
        group = torch.arange(groups, dtype=torch.int32).repeat_interleave(FERRET_SEEDS)
        seed = torch.randperm(FERRET_K, generator=g)[:FERRET_SEEDS].sort().values
        seed = seed.to(torch.int32).repeat(groups)
        return group, seed, torch.randn(group.numel(), generator=g) * 0.01

    def blob(i: int, rnd: int) -> bytes:
        group, seed, value = triples(i)
        return payloads.encode_seedcoef(
            group, seed, value, base_seed=fm.pool_base_seed(seed_cfg), k=FERRET_K,
            n_groups=groups, method="ferret", round=rnd,
        )  # fmt: skip

    def arrays(i: int) -> dict[str, np.ndarray]:
        return {k: t.numpy() for k, t in zip(("group", "seed", "value"), triples(i), strict=True)}

    return Workload(
        name=f"Ferret {FERRET_SEEDS} seeds x {groups} groups",
        method="ferret",
        method_cfg={"ferret": {"k": FERRET_K, "seed": seed_cfg}},
        model_dir=model_dir,
        make_blob=blob,
        make_tensors=arrays,
    )


# --- sockets ----------------------------------------------------------------------------------


@contextmanager
def sockets(n: int, hwm: int) -> Iterator[tuple[zmq.Socket[bytes], list[zmq.Socket[bytes]]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, hwm)
    router.setsockopt(zmq.RCVHWM, hwm)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealers = []
    for i in range(n):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.ROUTING_ID, f"edge-{i}".encode())
        d.setsockopt(zmq.LINGER, 0)
        d.connect(f"tcp://127.0.0.1:{port}")
        dealers.append(d)
    try:
        yield router, dealers
    finally:
        for d in dealers:
            d.close(0)
        router.close(0)
        ctx.term()


def send_all(dealers: list[zmq.Socket[bytes]], messages: list[Frames], go: threading.Event) -> None:
    go.wait()
    for d, frames in zip(dealers, messages, strict=True):
        d.send_multipart(frames, copy=False)


def timed_receive(
    router: zmq.Socket[bytes],
    dealers: list[zmq.Socket[bytes]],
    messages: list[Frames],
    handle: Callable[[zmq.Socket[bytes], list[zmq.Frame]], None],
    handled: list[int] | None = None,
    cpu: list[float] | None = None,
    settle: Callable[[], None] | None = None,
) -> float:
    """Seconds until every message is handled and, with ``settle``, what it waits for is done
    (``handled``: messages ``handle`` took itself);
    the process's CPU seconds meanwhile (every thread's, the sender's and ZeroMQ's I/O thread's
    included) are added to ``cpu[0]``."""
    go = threading.Event()
    sender = threading.Thread(target=send_all, args=(dealers, messages, go))
    sender.start()
    start = time.perf_counter()
    cpu_start = time.process_time()
    go.set()
    taken = 0
    while taken < len(messages):
        before = len(handled) if handled is not None else 0
        handle(router, router.recv_multipart(copy=False))
        taken += 1 + (len(handled) - before if handled is not None else 0)
    if settle is not None:  # the last updates summed (on a helper thread) too
        settle()
    elapsed = time.perf_counter() - start
    sender.join()
    if cpu is not None:
        cpu[0] += time.process_time() - cpu_start
    for d in dealers:  # drain the Acks outside the timing
        while d.poll(0):
            d.recv_multipart()
    return elapsed


def warm_up(router: zmq.Socket[bytes], dealers: list[zmq.Socket[bytes]]) -> None:
    """Connect every DEALER before timing (a first message waits for the TCP handshake)."""
    for d in dealers:
        d.send(b"ping")
    for _ in dealers:
        router.recv_multipart()


# --- the three receivers ----------------------------------------------------------------------


@dataclass
class Result:
    updates: int
    seconds: float
    wire_bytes: int
    close_seconds: float = 0.0
    decode_seconds: float = 0.0
    engine_seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    """Seconds per step of edgefed's intake (see :func:`instrument`)."""
    groups: int = 0
    """Group commits that held at least one update (one log sync each)."""
    cpu_seconds: float = 0.0
    """The process's CPU time while receiving (all its threads): the work, apart from how
    much of the machine it got (on a shared machine the seconds above depend on that)."""

    @property
    def rate(self) -> float:
        return self.updates / self.seconds

    @property
    def mbps(self) -> float:
        return self.wire_bytes / self.seconds / 1e6


@contextmanager
def instrument(steps: dict[str, float], targets: list[tuple[object, str, str]]) -> Iterator[None]:
    """Time every call of ``obj.attr`` into ``steps[label]`` (the attributes that exist: the
    same breakdown runs against an older intake)."""
    saved = []
    for obj, attr, label in targets:
        fn = getattr(obj, attr, None)
        if fn is None:
            continue

        def timed(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                steps[_label] = steps.get(_label, 0.0) + time.perf_counter() - t0

        saved.append((obj, attr, fn))
        setattr(obj, attr, timed)
    try:
        yield
    finally:
        for obj, attr, fn in reversed(saved):
            setattr(obj, attr, fn)


def intake_steps(engine: RoundEngine, ledger: Ledger) -> list[tuple[object, str, str]]:
    """The calls whose time :func:`run_edgefed` reports, by step."""
    from aggregator.engine import intake as intake_module

    log_module = sys.modules.get("aggregator.store.updatelog")
    flatsum_module = sys.modules.get("aggregator.methods.flatsum")
    method = engine.method
    return [
        (method, "validate", "validate (payload decode, checks, clip)"),
        (method, "add", "sum into the aggregate (queued; inline: the sum)"),
        *(
            [(flatsum_module, "_add", "  summing (helper threads, their sum; or inline)")]
            if flatsum_module
            else []
        ),
        (intake_module, "atomic_write_bytes", "blob write (temp+fsync+rename)"),
        (intake_module, "wait_synced", "wait for the group before's sync (overlapped)"),
        *(
            [
                (log_module.UpdateLog, "append", "log append (queued; inline: the write)"),
                (log_module.UpdateLog, "sync", "log sync (waits for the appends, fdatasync)"),
                (log_module.UpdateLog, "_write", "  record writes (appender thread, or inline)"),
            ]
            if log_module
            else []
        ),
        (os, "fsync", "fsync (in the blob write, or a new log's folder)"),
        (os, "fdatasync", "  of which fdatasync"),
        (ledger, "record_update", "ledger row (one commit each)"),
        (ledger, "record_updates", "ledger rows (one transaction per group, unsynced)"),
    ]


def run_edgefed(
    w: Workload,
    n: int,
    rounds: int,
    state: Path,
    pipeline: bool = True,
    direct: bool = True,
    settle: bool = True,
    helpers: int | None = None,
) -> Result:
    """``pipeline``: decode ahead, append on the appender thread, a group's sync while the
    next is taken, large updates summed on a helper thread (False: all on the loop);
    ``direct``: large log records with ``O_DIRECT`` (False: through the page cache);
    ``settle``: the round's close waits for the method's background work (Ferret's rebuild of
    the weights, ~1 s per round here), so the next round's intake does not run beside it
    (False: it does; rounds that follow each other this fast are this benchmark's, not a
    training run's, where agents train between rounds); ``helpers``: the accumulator's parts,
    each summed on a helper thread of its own (None: ``flatsum.HELPERS``, the service's)."""
    raw = {
        "server": {"state_dir": str(state), "heartbeat_interval": 1.0, "liveness": 3},
        "security": {"insecure": True},
        "run": {
            "run_id": "bench", "method": w.method, "rounds": rounds + 1, "min_agents": n,
            "eval": False, "model_sha256": SHA, "round_deadline_s": 3600.0,
            **({"model_dir": str(w.model_dir)} if w.model_dir else {}),
        },
        "method": w.method_cfg,
    }  # fmt: skip
    config = build_config(raw)
    clock = FixedClock()
    ledger = Ledger(state / "ledger.sqlite")
    store = CheckpointStore(state / "checkpoints")
    context = MethodContext(model_dir=config.run.model_dir, state_dir=state)
    method = server_methods()[w.method](config.method, context)
    engine = RoundEngine(config, method, MODEL, ledger=ledger, store=store, clock=clock)
    engine.start()
    agents = [f"edge-{i}" for i in range(n)]
    for a in agents:
        hello = Hello(agent_id=a, versions=[1], profile=PROFILE, models=[SHA])
        engine.on_message(a, decode(encode(hello)), clock.now)
    total = Result(0, 0.0, 0)
    accepted = 0

    group = getattr(engine, "group", None)  # group commit, where the engine has it
    count = getattr(engine.intake, "_count", None)
    if count is not None:  # a group recorded: one sync and one ledger transaction behind it

        def counted(*a: Any, **k: Any) -> Any:
            total.groups += 1
            return count(*a, **k)

        engine.intake._count = counted  # type: ignore[method-assign]
    # a group's sync overlapping the next group's intake, where the engine has it (pipeline)
    overlap = {"overlap": True} if pipeline and hasattr(engine, "syncing") else {}

    def reply(sock: zmq.Socket[bytes], replies: list[Any]) -> None:
        nonlocal accepted
        for out in replies:
            accepted += getattr(out.header, "accepted", False) is True
            sock.send_multipart([out.agent_id.encode(), *encode(out.header, out.blobs)])

    ahead: Any = None
    try:  # decoding ahead and the appender thread, where the service has them
        from aggregator.engine.pipeline import DecodeAhead
        from aggregator.store.updatelog import UpdateLog

        UpdateLog.appender = pipeline
        from aggregator.methods.flatsum import FlatSum

        FlatSum.parallel = pipeline  # type: ignore[attr-defined,unused-ignore]
        if helpers is not None and hasattr(FlatSum, "helpers"):
            FlatSum.helpers = helpers
        if hasattr(UpdateLog, "direct"):
            UpdateLog.direct = direct
        ahead = DecodeAhead() if pipeline else None
    except ImportError:
        pass

    def one(sock: zmq.Socket[bytes], frames: list[zmq.Frame], decoded: Any = None) -> None:
        agent_id = bytes(frames[0].buffer).decode("ascii")
        t0 = time.perf_counter()
        msg = decoded() if decoded is not None else decode(frames[1:])
        t1 = time.perf_counter()
        replies = engine.on_message(agent_id, msg, clock.now)
        total.decode_seconds += t1 - t0
        total.engine_seconds += time.perf_counter() - t1
        reply(sock, replies)

    def take_ahead(sock: zmq.Socket[bytes], into: list[tuple[list[zmq.Frame], Any]]) -> None:
        while len(into) < 256:  # what the service does while it handles a group
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handled.append(1)
            into.append((frames, ahead.start(frames[1:]) if hasattr(ahead, "start") else None))

    def handle(sock: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        if group is None:
            return one(sock, frames)
        # what the service does: the burst that has arrived is decoded ahead on a worker and
        # handled as one group, then its Acks go out; with the pipeline, messages arriving
        # meanwhile are taken (their decoding started) and the next group is taken while this
        # one syncs, until nothing more is here
        taken: list[tuple[list[zmq.Frame], Any]] = []
        fresh = [frames]
        while True:
            burst, taken = taken, []
            while len(burst) + len(fresh) < 256:
                try:
                    fresh.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
                handled.append(1)
            decoders = ahead.burst([f[1:] for f in fresh]) if ahead else [None] * len(fresh)
            burst += zip(fresh, decoders, strict=True)
            fresh = []
            with group(**overlap) as replies:  # with overlap: the Acks of the group before
                for f, decoded in burst:
                    if overlap:
                        take_ahead(sock, taken)
                    one(sock, f, decoded)
                t0 = time.perf_counter()
            more = bool(overlap) and bool(taken or sock.poll(0))
            if overlap and not more:  # nothing more here: what the service's tick does
                replies += engine.flush()
            total.engine_seconds += time.perf_counter() - t0
            reply(sock, replies)
            if not more:
                return

    handled: list[int] = []

    with sockets(n, config.server.hwm) as (router, dealers):
        warm_up(router, dealers)
        for _ in range(rounds):
            clock.now += 0.1
            assigns = {o.agent_id: o.header for o in engine.tick(clock.now)}
            messages = []
            for i, a in enumerate(agents):
                task = assigns[a]
                assert isinstance(task, TaskAssign)
                header = TaskResult(
                    run_id=task.run_id, round=task.round, task_id=task.task_id, agent_id=a,
                    method=w.method, num_examples=32 + i, metrics={"train_loss": 1.0},
                )  # fmt: skip
                messages.append(encode(header, {"update": w.make_blob(i, task.round)}))
            handled.clear()
            with instrument(total.steps, intake_steps(engine, ledger)):
                cpu = [0.0]
                total.seconds += timed_receive(
                    router, dealers, messages, handle, handled, cpu, getattr(method, "settle", None)
                )
                total.cpu_seconds += cpu[0]
            total.updates += n
            total.wire_bytes += sum(frames_nbytes(m) for m in messages)
            start = time.perf_counter()
            clock.now += 0.1
            engine.tick(clock.now)  # closes the round: mean, checkpoint save, ledger commit
            if settle:  # and what the method goes on with in the background (Ferret's rebuild)
                getattr(method, "wait_weights", lambda: None)()
            total.close_seconds += time.perf_counter() - start
    ledger.close()
    if ahead is not None:
        ahead.close()
    if accepted != total.updates:
        raise RuntimeError(f"only {accepted} of {total.updates} updates were accepted")
    return total


def run_pickle(w: Workload, n: int, rounds: int) -> Result:
    total = Result(0, 0.0, 0)
    sums: dict[str, np.ndarray] = {}

    def handle(sock: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        # the naive baseline being measured: never do this with bytes from a network peer
        msg = pickle.loads(frames[1].buffer)  # noqa: S301
        weight = float(msg["num_examples"])
        for name, arr in msg["tensors"].items():
            acc = sums.setdefault(name, np.zeros(arr.shape, np.float64))
            acc += weight * arr

    with sockets(n, 8) as (router, dealers):
        warm_up(router, dealers)
        for rnd in range(1, rounds + 1):
            messages = [
                [pickle.dumps({"agent_id": f"edge-{i}", "round": rnd, "num_examples": 32 + i,
                               "tensors": w.make_tensors(i)}, protocol=5)]
                for i in range(n)
            ]  # fmt: skip
            cpu = [0.0]
            total.seconds += timed_receive(router, dealers, messages, handle, cpu=cpu)
            total.cpu_seconds += cpu[0]
            total.updates += n
            total.wire_bytes += sum(len(m[0]) for m in messages)
    return total


def run_raw(w: Workload, n: int, rounds: int) -> Result:
    total = Result(0, 0.0, 0)
    with sockets(n, 8) as (router, dealers):
        warm_up(router, dealers)
        for rnd in range(1, rounds + 1):
            messages = [[w.make_blob(i, rnd)] for i in range(n)]
            cpu = [0.0]
            total.seconds += timed_receive(router, dealers, messages, lambda s, f: None, cpu=cpu)
            total.cpu_seconds += cpu[0]
            total.updates += n
            total.wire_bytes += sum(len(m[0]) for m in messages)
    return total


ROW = "{:<28} {:<44} {:>9} {:>9} {:>10} {:>10}"
RECEIVERS = {
    "raw": "raw loopback (opaque frames)",
    "pickle": "naive pickle + numpy sum",
    "edgefed": "edgefed (decode+validate+fsync+ledger+sum)",
    "edgefed-serial": "edgefed, no pipeline threads",
    "edgefed-buffered": "edgefed, log without O_DIRECT",
    "edgefed-unsettled": "edgefed, last round's rebuild running",
    "edgefed-one-helper": "edgefed, summing on one helper",
}
LARGE_ONLY = {"edgefed-buffered", "edgefed-one-helper"}
"""Receivers that differ from ``edgefed`` only for updates of 1 MiB and more (not run for
Ferret's)."""
BACKGROUND_ONLY = {"edgefed-unsettled"}
"""Receivers that differ from ``edgefed`` only for a method with background work (Ferret)."""


def sum_helpers() -> int:
    """The accumulator's helpers in the ``edgefed`` rows: ``--sum-helpers`` (passed to each
    receiver's process in the environment), else ``flatsum.HELPERS`` (the service's)."""
    from aggregator.methods.flatsum import HELPERS

    return int(os.environ.get("EDGEFED_BENCH_SUM_HELPERS") or HELPERS)


def workload(name: str, tmp: Path) -> Workload:
    return lora_workload() if name == "lora" else ferret_workload(tmp / "model")


def run_one(name: str, receiver: str, n: int, rounds: int, tmp: Path) -> Result:
    w = workload(name, tmp)
    if receiver == "raw":
        return run_raw(w, n, rounds)
    if receiver == "pickle":
        return run_pickle(w, n, rounds)
    state = tmp / f"state-{w.method}-{receiver}-{time.monotonic_ns()}"
    pipeline = receiver != "edgefed-serial"
    direct = receiver != "edgefed-buffered"
    helpers = 1 if receiver == "edgefed-one-helper" else sum_helpers()
    return run_edgefed(
        w, n, rounds, state, pipeline, direct, receiver != "edgefed-unsettled", helpers
    )


def in_process(name: str, receiver: str, n: int, rounds: int, tmp: Path) -> Result:
    """One receiver in a fresh interpreter (``--one``); its Result comes back as JSON."""
    cmd = [sys.executable, __file__, "--one", name, receiver, str(n), str(rounds), str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{receiver} on {name} failed:\n{proc.stderr[-4000:]}")
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


def report(w: Workload, n: int, rounds: int, results: dict[str, Result], label: str) -> None:
    raw_mbps = results[RECEIVERS["raw"]].mbps
    for name, r in results.items():
        print(ROW.format(w.name, name, r.updates, f"{r.rate:,.1f}", f"{r.mbps:,.1f}",
                         f"{r.mbps / raw_mbps:.3f}"))  # fmt: skip
    ef, pk = results[RECEIVERS["edgefed"]], results[RECEIVERS["pickle"]]
    serial = results[RECEIVERS["edgefed-serial"]]
    buffered = results.get(RECEIVERS["edgefed-buffered"])
    unsettled = results.get(RECEIVERS["edgefed-unsettled"])
    one_helper = results.get(RECEIVERS["edgefed-one-helper"])
    print(
        f"  {w.name}{label}: {n} agents x {rounds} rounds, {ef.wire_bytes // ef.updates:,} B per "
        f"edgefed message; edgefed / pickle updates/s = {ef.rate / pk.rate:.2f}; pipeline / "
        f"no pipeline {ef.rate / serial.rate:.2f}"
        + (f"; O_DIRECT / buffered log {ef.rate / buffered.rate:.2f}" if buffered else "")
        + (f"; rebuild done / running {ef.rate / unsettled.rate:.2f}" if unsettled else "")
        + (
            f"; {sum_helpers()} summing helpers / one {ef.rate / one_helper.rate:.2f}"
            if one_helper
            else ""
        )  # fmt: skip
        + f"; round close (mean + checkpoint + background work) "
        f"{1000 * ef.close_seconds / rounds:.0f} ms/round; "
        f"updates per group commit {ef.updates / max(ef.groups, 1):.1f} (a round's {n} agents "
        "send at once)"
    )
    print(
        "  process CPU per update (every thread: the sender's and ZeroMQ's too): "
        + ", ".join(
            f"{name.split(' (')[0]} {1000 * r.cpu_seconds / r.updates:.1f} ms"
            for name, r in results.items()
        )
    )
    for title, r in (("edgefed", ef), ("no pipeline", serial)):
        print(f"  per {title} update: frames.decode (sha256; what the loop waited for, when "
              f"decoded ahead) {1000 * r.decode_seconds / r.updates:.2f} ms, engine "
              f"{1000 * r.engine_seconds / r.updates:.2f} ms, of which:")  # fmt: skip
        for step, seconds in sorted(r.steps.items(), key=lambda kv: -kv[1]):
            print(f"    {step:<52} {1000 * seconds / r.updates:8.2f} ms "
                  f"({100 * seconds / r.seconds:4.1f}% of the receive time)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few agents, 1-2 rounds")
    parser.add_argument("--agents", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", choices=("lora", "ferret"), default=None)
    parser.add_argument("--repeat", type=int, default=1, help="run every receiver N times")
    parser.add_argument("--sum-helpers", type=int, default=None,
                        help="the accumulator's helper threads in the edgefed rows (default: "
                        "the service's, flatsum.HELPERS); above 1, the 'summing on one helper' "
                        "row runs beside")  # fmt: skip
    parser.add_argument("--one", nargs=5, metavar=("WORKLOAD", "RECEIVER", "N", "ROUNDS", "TMP"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.sum_helpers is not None:
        os.environ["EDGEFED_BENCH_SUM_HELPERS"] = str(max(1, args.sum_helpers))
    if args.one:
        name, receiver, n, rounds, tmp_dir = args.one
        result = run_one(name, receiver, int(n), int(rounds), Path(tmp_dir))
        print(json.dumps(asdict(result)))
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-") as tmp_name:
        tmp = Path(tmp_name)
        plans = (
            ("lora", args.agents or (2 if args.quick else 8), args.rounds or (1 if args.quick else 3)),
            ("ferret", args.agents or (4 if args.quick else 16), args.rounds or (2 if args.quick else 10)),
        )  # fmt: skip
        print(ROW.format("workload", "receiver", "updates", "upd/s", "MB/s", "x raw MB/s"))
        for name, n, rounds in plans:
            if args.only and name != args.only:
                continue
            w = workload(name, tmp)
            for rep in range(args.repeat):  # the receivers of a repetition run back to back
                results = {
                    label: in_process(name, receiver, n, rounds, tmp)
                    for receiver, label in RECEIVERS.items()
                    if receiver not in (BACKGROUND_ONLY if name == "lora" else LARGE_ONLY)
                    and (receiver != "edgefed-one-helper" or sum_helpers() > 1)
                }
                report(w, n, rounds, results, f" (repetition {rep + 1})" if args.repeat > 1 else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
