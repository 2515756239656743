"""Agent memory: each precision and each method's agent, in a fresh process, from ``/proc``.

Run: ``python benchmarks/agent_memory.py [--quick] [--steps N] [--methods ...]``. Every task is
the method's real round-1 task: the parent instantiates the method's server half
(``aggregator.methods.<method>``) with its default parameters on the model (``run.model_dir``;
public data for FedBiOT) and asks it the way the engine does (``on_hello``, ``admit``, the score
phase while ``wants_score``, ``plan``, ``assign``): FedPipe's score task and planned ranks, batch
and precision, SLoRA's stage-1 mask seed, FedBiOT's emulator bundle and alignment state (built
and aligned first, its ``align.initial_steps`` included). Each task then runs in a fresh process
that imports the agent, loads the base the method's client asks for through the agent's own
workspace (:class:`edge_agent.daemon.workspace.AgentWorkspace`, so NF4/int8/bf16 come from their
saved checkpoints, made beforehand in another process as ``edgefed-agent model prepare`` would;
FedBiOT loads none: it builds its emulator from the bundle), reads the task's blobs as received
frames and runs the method's client half, on examples long enough to fill ``max_len``. Its
result goes back to the server (``add_score`` / ``validate``): a task whose update the server
would refuse is reported as failed, not measured. A sampling thread reads
``/proc/self/status`` every 2 ms: anonymous memory (``RssAnon``: heap, weights copied out of
files, activations, gradients, received blobs) and file-backed memory (``RssFile``: mapped
safetensors, libraries) are reported apart, with the import floor (after importing torch,
transformers, peft, bitsandbytes and the agent) and the process peak (``VmHWM``). Step times
are the median after the first step. A second table gives each task's bytes down
(``TaskAssign`` + blobs) and up (``TaskResult`` + blobs) as ``protocol.frames.encode`` lays
them out, FedBiOT's one-off emulator bundle apart.

Rows: ``fedit`` in fp32, nf4, int8 and bf16 without gradient checkpointing (``--quants``; the
first is the reference of ``x ref``), nf4 and int8 with it (``--ckpt``), then each method of
``--methods`` at the run's precision (``run.quant``'s default, nf4; with the method's default
checkpointing unless ``NAME+ckpt``). Only ``train.steps`` (and Ferret's batch 4 × 384 tokens
of issue 25) differ from the defaults; FedPipe's planned step count is replaced by ``--steps``.
``--quick`` runs fp32 and nf4 FedIT and every other method on a tiny random 6-layer model
(so CI can run it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20
FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


def status() -> dict[str, int]:
    """The memory fields of ``/proc/self/status``, in bytes."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Peaks of anonymous and file-backed memory, polled on a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _poll(self) -> None:
        now = status()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(interval)


def examples_file(folder: Path, n: int = 16, name: str = "train.jsonl") -> Path:
    """Examples whose prompt alone is longer than any ``max_len`` used here."""
    words = [
        "the",
        "federated",
        "agent",
        "trains",
        "a",
        "small",
        "model",
        "on",
        "private",
        "examples",
    ]
    lines = []
    for i in range(n):
        prompt = " ".join(words[(i + j) % len(words)] for j in range(400))
        lines.append(json.dumps({"instruction": f"Q{i}: {prompt}", "output": f"answer {i} " * 20}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


AGENT = "edge-1"
RUN_QUANT = "nf4"
"""The run's base precision (``run.quant``'s default) unless a row or the method says otherwise."""


def bench_params(method: str, ckpt: bool | None, quick: bool, steps: int) -> dict[str, Any]:
    """The run's method parameters: the defaults, but ``steps`` train steps (and Ferret's batch 4
    × 384 tokens of issue 25; ``--quick``: batch 2 × 32 tokens)."""
    train: dict[str, Any] = {"steps": steps}
    if ckpt is not None:  # None: the method's default
        train["gradient_checkpointing"] = ckpt
    if method == "ferret":
        train |= {"max_len": 384, "batch_size": 4}
    if quick:
        train |= {"max_len": 32, "batch_size": 2}
    return {"train": train}


def merged(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` with ``b`` laid over it, nested dicts merged."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def method_overrides(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``["fedbiot:align.initial_steps=0"]`` → ``{"fedbiot": {"align": {"initial_steps": 0}}}``."""
    from aggregator.local.options import parse_params

    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        method, colon, rest = spec.partition(":")
        if not colon:
            raise SystemExit(f"--param {spec!r}: expected METHOD:KEY=VALUE")
        out[method] = merged(out.get(method, {}), parse_params([rest]))
    return out


def base_quant(method: str, params: Any, quant: str) -> str | None:
    """The precision the method's client asks the workspace for (None: it loads no base)."""
    if method in ("ferret", "fedavg"):
        return str(params.ferret.dtype if method == "ferret" else params.fedavg.dtype)
    if method == "slora" and params.stage == 1:
        from protocol.methods.slora.spec import stage1_quant

        return stage1_quant(quant)
    if method == "fedbiot":
        return None  # training builds the emulator from its bundle and never loads the base
    return quant


# --- the server half: each method's real round-1 task ----------------------------------------


def write_task(folder: Path, assign: Any, blobs: Mapping[str, Any]) -> dict[str, Any]:
    """A task as files for the measuring process; its download size as the wire lays it out."""
    from protocol.frames import encode, frames_nbytes

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "assign.json").write_text(assign.model_dump_json())
    for name, data in blobs.items():
        (folder / f"{name}.blob").write_bytes(data)
    return {
        "task": str(folder),
        "down": frames_nbytes(encode(assign, dict(blobs))),
        "down_blobs": {n: len(memoryview(b).cast("B")) for n, b in blobs.items()},
    }


def read_blobs(folder: Path, suffix: str = ".blob") -> dict[str, memoryview]:
    out: dict[str, memoryview] = {}
    for path in sorted(folder.glob(f"*{suffix}")):
        data = bytearray(path.stat().st_size)  # received frames: the process's own memory
        with open(path, "rb") as fh:
            fh.readinto(data)
        out[path.name.removesuffix(suffix)] = memoryview(data)
    return out


class Round1:
    """A method's server half on the model, asked for agent ``AGENT``'s round-1 tasks the way
    the engine asks (``on_hello``, ``admit``, the score phase if ``wants_score``, ``plan``,
    ``assign``); each task runs in a fresh process and its result goes back to the server
    (``add_score`` / ``validate``), so a task the server would refuse is not measured."""

    def __init__(self, row: dict[str, Any], folder: Path) -> None:
        from aggregator.methods import AgentView, MethodContext, server_methods
        from edge_agent.daemon.profile import collect_profile
        from edge_agent.model.store import resolve_model
        from protocol.messages import BaseModelRef, Profile

        self.row, self.folder = row, folder
        self.method = row["method"]
        resolved = resolve_model(row["model"], Path(row["cache"]) if row["cache"] else None)
        self.model = BaseModelRef(name=resolved.name, sha256=resolved.sha256)
        context = MethodContext(
            model_name=resolved.name,
            model_dir=Path(resolved.path),
            state_dir=folder / "state",
            seed=0,
            public_data=examples_file(folder, 64, "public.jsonl"),  # FedBiOT aligns on it
        )
        params = merged(
            bench_params(self.method, row["ckpt"], row["quick"], row["steps"]),
            row.get("params", {}).get(self.method, {}),
        )
        self.server = server_methods()[self.method](params, context)
        self.profile = Profile.model_validate(collect_profile(measure=not row["quick"]))
        self.view = AgentView(AGENT, self.profile)

    def _hook(self, name: str, *args: Any) -> Any:
        fn = getattr(self.server, name, None)
        return fn(*args) if callable(fn) else None

    def _admit(self) -> None:
        prepare = getattr(self.server, "prepare", None)
        if callable(prepare):  # FedBiOT: what its background job does (build, align), here
            prepare()
        reason = self._hook("admit", AGENT, self.profile)
        if reason:
            raise RuntimeError(f"the server does not admit the agent: {reason}")

    def _task(self, kind: str) -> tuple[Any, Mapping[str, Any]]:
        from protocol.messages import TaskAssign

        a = self.server.assign(1, AGENT, kind)
        params = json.loads(json.dumps(a.params))
        if self.method == "fedpipe" and kind == "train":  # planned steps: the bench's count
            params["train"]["steps"] = self.row["steps"]
            if self.row["quick"]:
                params["train"] |= {"max_len": 32, "batch_size": 2}
        assign = TaskAssign(
            run_id="bench",
            round=1,
            task_id=f"bench-r1-{kind}",
            kind=kind,  # type: ignore[arg-type]
            method=self.method,
            model=self.model,
            quant=a.quant or self.row["quant"],  # type: ignore[arg-type]
            params=params,
            deadline_s=3600.0,
        )
        return assign, a.blobs

    def _result(self, assign: Any, out: dict[str, Any]) -> tuple[Any, dict[str, memoryview]]:
        from protocol.frames import encode, frames_nbytes
        from protocol.messages import TaskResult

        result = TaskResult(
            run_id="bench",
            round=1,
            task_id=assign.task_id,
            agent_id=AGENT,
            method=self.method,
            kind=assign.kind,
            num_examples=out["num_examples"],
            metrics=out["metrics"],
        )
        blobs = read_blobs(Path(assign_dir(out)), ".out")
        out["up"] = frames_nbytes(encode(result, blobs))
        out["up_blobs"] = {n: b.nbytes for n, b in blobs.items()}
        return result, blobs

    def run(self, measure_row: Any) -> list[tuple[str, dict[str, Any]]]:
        """``(kind, figures)`` of each round-1 task, measured by ``measure_row(row)``."""
        self._hook("on_hello", self.view)
        self._admit()
        done: list[tuple[str, dict[str, Any]]] = []
        if self._hook("wants_score", 1):
            assign, blobs = self._task("score")
            task = write_task(self.folder / "score", assign, blobs)
            out = measure_row(self.row | task) | task
            result, up = self._result(assign, out)
            self._hook("add_score", 1, result, up)
            self._hook("finish_score", 1)
            done.append(("score", out))
        self._hook("plan", 1, "train", {AGENT: self.view})
        self.server.begin_round(1)
        assign, blobs = self._task("train")
        task = write_task(self.folder / "train", assign, blobs)
        out = measure_row(self.row | task) | task
        result, up = self._result(assign, out)
        self.server.validate(1, result, up)  # raises if the server would refuse the update
        out["plan"] = plan_note(self.method, assign)
        done.append(("train", out))
        return done


def assign_dir(out: dict[str, Any]) -> str:
    return str(out["task"])


def plan_note(method: str, assign: Any) -> str:
    """What the server chose for the agent that the table should show."""
    p = assign.params
    if method == "fedpipe":
        ranks = p.get("ranks") or {}
        rs = sorted(set(ranks.values()), reverse=True)
        return f"{len(ranks)} matrices r {rs}, {assign.quant}, batch {p['train']['batch_size']}"
    if method == "slora":
        return f"stage {p.get('stage')}"
    return ""


def measure(row: dict[str, Any]) -> dict[str, Any]:
    """One task, in this (fresh) process."""
    import bitsandbytes  # noqa: F401  (the agent imports it for NF4/int8)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from edge_agent.daemon.workspace import AgentWorkspace, WorkspaceSettings
    from edge_agent.methods import TaskInput, client_methods
    from edge_agent.model.store import base_param_bytes
    from protocol.messages import TaskAssign
    from protocol.methods import parse_params

    torch.set_num_threads(2)
    floor = status()
    stamps: list[float] = []

    class Timed(AgentWorkspace):
        def report_progress(self, fraction: float) -> None:
            stamps.append(time.perf_counter())
            super().report_progress(fraction)

    task_dir = Path(row["task"])
    assign = TaskAssign.model_validate_json((task_dir / "assign.json").read_text())
    folder = Path(tempfile.mkdtemp(prefix="edgefed-agent-memory-"))
    settings = WorkspaceSettings(
        model=row["model"],
        data=examples_file(folder),
        model_cache=Path(row["cache"]) if row["cache"] else None,
        objects_dir=folder / "objects",
    )
    ws = Timed(settings)
    ws.resolved_model()
    method = assign.method
    params = parse_params(method, assign.params)
    quant = base_quant(method, params, assign.quant) if assign.kind == "train" else assign.quant
    base_bytes = 0
    with Sampler() as sampler:
        start = time.perf_counter()
        if quant is not None:
            base_bytes = base_param_bytes(ws.base(assign.model, quant)[0])
        loaded_s = time.perf_counter() - start
        loaded = status()
        blobs = read_blobs(task_dir)  # the task's frames, as received
        task = TaskInput(assign=assign, params=params, blobs=blobs, agent_id=AGENT)
        stamps.append(time.perf_counter())
        output = client_methods()[method]().run(task, ws)
    peak = status()["VmHWM"]
    held = getattr(ws.cache.get(method), "model", None)
    if quant is None and held is not None:  # FedBiOT: the emulator it built instead of a base
        quant = "emu"
        tensors = {t.data_ptr(): t for t in held.state_dict().values()}  # tied weights once
        base_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    for name, data in output.blobs.items():
        (task_dir / f"{name}.out").write_bytes(data)
    shutil.rmtree(folder, ignore_errors=True)  # the objects FedBiOT stored: its bundle
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return {
        "floor_anon": floor["RssAnon"],
        "floor_file": floor["RssFile"],
        "load_s": loaded_s,
        "loaded_anon": loaded["RssAnon"],
        "loaded_file": loaded["RssFile"],
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
        "peak": peak,
        "step_s": statistics.median(steps) if steps else float("nan"),
        "base_bytes": base_bytes,
        "base_quant": quant or "-",
        "num_examples": output.num_examples,
        "metrics": output.metrics,
    }


def prepare(model: str, cache: str | None, quants: list[str]) -> None:
    """Make the saved checkpoints (as ``edgefed-agent model prepare`` does), not measured."""
    from edge_agent.model.store import load_base, resolve_model

    resolved = resolve_model(model, Path(cache) if cache else None)
    for quant in quants:
        load_base(resolved, quant, cache_dir=Path(cache) if cache else None)  # type: ignore[arg-type]


def run_child(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def rows_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"model": args.model, "cache": args.cache, "quick": args.quick, "ckpt": False}
    base["steps"] = args.steps
    base["params"] = method_overrides(args.param)
    if args.quick:
        rows = [base | {"method": "fedit", "quant": q} for q in ("fp32", "nf4")]
        return rows + [base | {"method": m, "quant": RUN_QUANT, "ckpt": None} for m in QUICK]
    rows = [base | {"method": "fedit", "quant": q} for q in args.quants]
    rows += [base | {"method": "fedit", "quant": q, "ckpt": True} for q in args.ckpt]
    for name in args.methods:  # "ferret+ckpt": with gradient checkpointing
        method, _, ckpt = name.partition("+")
        rows.append(base | {"method": method, "quant": RUN_QUANT, "ckpt": ckpt == "ckpt" or None})
    return rows


QUICK = ("fedavg", "slora", "fedpipe", "fedbiot", "ferret")
"""The other methods' rows of ``--quick`` (default parameters, the run's precision)."""


class Runner:
    """Measures tasks in fresh processes, making each precision's saved checkpoint first."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prepared: set[str] = {"fp32"}

    def prepare(self, quants: set[str]) -> None:
        todo = sorted(quants - self.prepared)
        if not todo:
            return
        if self.args.quick:  # the parent has imported transformers already: spare a process
            prepare(self.args.model, self.args.cache, todo)
        else:
            run_child(
                ["--prepare", ",".join(todo), "--model", self.args.model, *cache_args(self.args)]
            )
        self.prepared |= set(todo)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from protocol.messages import TaskAssign
        from protocol.methods import parse_params

        assign = TaskAssign.model_validate_json((Path(row["task"]) / "assign.json").read_text())
        params = parse_params(assign.method, assign.params)
        quant: str = assign.quant
        if assign.kind == "train":
            quant = base_quant(assign.method, params, assign.quant) or "fp32"
        self.prepare({quant})
        return dict(json.loads(run_child(["--one", json.dumps(row)])))


def label_of(row: dict[str, Any], kind: str) -> str:
    if row["method"] == "fedit":
        return f"fedit {row['quant']}" + ("+ckpt" if row["ckpt"] else "")
    name = row["method"] + (" score" if kind == "score" else "")
    return name + ("+ckpt" if row["ckpt"] else "")


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help="Alias, HF directory or .gguf.")
    parser.add_argument("--cache", default=None, help="Model cache (default: the agent's).")
    parser.add_argument("--steps", type=int, default=3, help="Training steps per row.")
    parser.add_argument("--quants", nargs="*", default=["fp32", "nf4", "int8", "bf16"])
    parser.add_argument("--ckpt", nargs="*", default=["nf4", "int8"], help="+ckpt rows.")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["ferret", "ferret+ckpt", "fedavg", "slora", "fedpipe", "fedbiot"],
        help="Methods' rows at the run's default precision (NAME, or NAME+ckpt).",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="A method parameter other than its default (e.g. fedbiot:align.initial_steps=0).",
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    if args.prepare:
        prepare(args.model, args.cache, args.prepare.split(","))
        return 0
    if args.quick and args.model == "smollm2-135m":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _tiny import tiny_model_dir

        args.model = tiny_model_dir(layers=6)  # FedBiOT cuts an emulator out of the bottom 4
        args.cache = args.cache or str(Path(args.model).parent / "cache")
        args.steps = 2
    runner = Runner(args)
    print(
        f"{'agent':<15} {'base':>4} {'base MiB':>8} {'floor':>6} {'loaded anon/file':>17} "
        f"{'peak anon/file':>15} {'peak':>6} {'x ref':>6} {'step s':>7} {'load s':>6}"
    )
    ref: dict[str, Any] | None = None
    traffic: list[tuple[str, dict[str, Any]]] = []
    for row in rows_for(args):
        label = label_of(row, "train")
        folder = Path(tempfile.mkdtemp(prefix="edgefed-agent-memory-task-"))
        try:
            done = Round1(row, folder).run(runner)
        except Exception as exc:  # a row that fails is reported, the rest run
            last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            print(f"{label:<15} failed: {last[0][:110]}", flush=True)
            continue
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # fedavg's update alone is 513 MB
        for kind, r in done:
            ref = ref or r
            label = label_of(row, kind)
            traffic.append((label, r))
            floor = (r["floor_anon"] + r["floor_file"]) / MiB
            print(
                f"{label:<15} {r['base_quant']:>4} {r['base_bytes'] / MiB:>8.1f} {floor:>6.0f} "
                f"{r['loaded_anon'] / MiB:>8.0f}/{r['loaded_file'] / MiB:<8.0f} "
                f"{r['peak_anon'] / MiB:>7.0f}/{r['peak_file'] / MiB:<7.0f} "
                f"{r['peak'] / MiB:>6.0f} {r['peak'] / ref['peak']:>6.3f} {r['step_s']:>7.2f} "
                f"{r['load_s']:>6.1f}",
                flush=True,
            )
    print("\nround-1 bytes per agent (messages as protocol.frames lays them out):")
    print(f"{'agent':<15} {'down':>9} {'of which emulator':>17} {'up':>9}  server's plan")
    for label, r in traffic:
        bundle = sum(n for b, n in r["down_blobs"].items() if b.startswith("emulator"))
        print(
            f"{label:<15} {fmt_bytes(r['down']):>9} {fmt_bytes(bundle) if bundle else '-':>17} "
            f"{fmt_bytes(r['up']):>9}  {r.get('plan', '')}"
        )
    return 0


def cache_args(args: argparse.Namespace) -> list[str]:
    return ["--cache", args.cache] if args.cache else []


if __name__ == "__main__":
    sys.exit(main())
