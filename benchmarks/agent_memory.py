"""Agent memory: each precision and each method's agent, in a fresh process, from ``/proc``.

Run: ``python benchmarks/agent_memory.py [--quick] [--steps N] [--methods ...]``. Every row is
a fresh process that imports the agent, loads the base through the agent's own workspace
(:class:`edge_agent.daemon.workspace.AgentWorkspace`, so NF4/int8/bf16 come from their saved
checkpoints, made beforehand in another process as ``edgefed-agent model prepare`` would) and
runs one round-1 train task of the method's client half with its default parameters, on
examples long enough to fill ``max_len``. A sampling thread reads ``/proc/self/status`` every
2 ms: anonymous memory (``RssAnon``: heap, weights copied out of files, activations, gradients)
and file-backed memory (``RssFile``: mapped safetensors, libraries) are reported apart, with
the import floor (after importing torch, transformers, peft, bitsandbytes and the agent) and
the process peak (``VmHWM``). Step times are the median after the first step.

Rows: ``fedit`` in fp32, nf4, int8 and bf16 without gradient checkpointing (``--quants``; the
first is the reference), nf4 and int8 with it (``--ckpt``), then each other method
(``--methods``, with its default checkpointing unless ``NAME+ckpt``) (Ferret trains
the unquantized base in fp32, with ``max_len`` 384 and batch 4 as in issue 25).
``--quick`` runs fp32 and nf4 FedIT on a tiny random model (so CI can run it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def examples_file(folder: Path, n: int = 16) -> Path:
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
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def method_params(method: str, ckpt: bool | None, quick: bool, steps: int) -> dict[str, Any]:
    train: dict[str, Any] = {"steps": steps}
    if ckpt is not None:  # None: the method's default
        train["gradient_checkpointing"] = ckpt
    if method == "ferret":
        train |= {"max_len": 384, "batch_size": 4}
    if quick:
        train |= {"max_len": 32, "batch_size": 2}
    return {"train": train}


def measure(row: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process."""
    import bitsandbytes  # noqa: F401  (the agent imports it for NF4/int8)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from edge_agent.daemon.workspace import AgentWorkspace, WorkspaceSettings
    from edge_agent.methods import TaskInput, client_methods
    from protocol.messages import BaseModelRef, TaskAssign
    from protocol.methods import parse_params

    torch.set_num_threads(2)
    floor = status()
    stamps: list[float] = []

    class Timed(AgentWorkspace):
        def report_progress(self, fraction: float) -> None:
            stamps.append(time.perf_counter())
            super().report_progress(fraction)

    folder = Path(tempfile.mkdtemp(prefix="edgefed-agent-memory-"))
    settings = WorkspaceSettings(
        model=row["model"],
        data=examples_file(folder),
        model_cache=Path(row["cache"]) if row["cache"] else None,
        objects_dir=folder / "objects",
    )
    ws = Timed(settings)
    resolved = ws.resolved_model()
    method, quant = row["method"], row["quant"]
    params = method_params(method, row["ckpt"], row["quick"], row["steps"])
    assign = TaskAssign(
        run_id="bench",
        round=1,
        task_id="bench-r1",
        kind="train",
        method=method,
        model=BaseModelRef(name=resolved.name, sha256=resolved.sha256),
        quant=quant,
        params=params,
        deadline_s=3600.0,
    )
    task = TaskInput(assign=assign, params=parse_params(method, params), blobs={})
    with Sampler() as sampler:
        start = time.perf_counter()
        ws.base(assign.model, "fp32" if method == "ferret" else quant)
        loaded_s = time.perf_counter() - start
        loaded = status()
        stamps.append(time.perf_counter())
        client_methods()[method]().run(task, ws)
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    from edge_agent.model.store import base_param_bytes

    base = ws.base(assign.model, "fp32" if method == "ferret" else quant)[0]
    return {
        "floor_anon": floor["RssAnon"],
        "floor_file": floor["RssFile"],
        "load_s": loaded_s,
        "loaded_anon": loaded["RssAnon"],
        "loaded_file": loaded["RssFile"],
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
        "peak": status()["VmHWM"],
        "step_s": statistics.median(steps) if steps else float("nan"),
        "base_bytes": base_param_bytes(base),
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
    if args.quick:
        return [base | {"method": "fedit", "quant": q} for q in ("fp32", "nf4")]
    rows = [base | {"method": "fedit", "quant": q} for q in args.quants]
    rows += [base | {"method": "fedit", "quant": q, "ckpt": True} for q in args.ckpt]
    for name in args.methods:  # "ferret+ckpt": with gradient checkpointing
        method, _, ckpt = name.partition("+")
        rows.append(base | {"method": method, "quant": "nf4", "ckpt": ckpt == "ckpt" or None})
    return rows


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
        default=["ferret", "ferret+ckpt", "slora", "fedpipe", "fedbiot"],
        help="Other methods' rows (NAME or NAME+ckpt).",
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

        args.model = tiny_model_dir()
        args.cache = args.cache or str(Path(args.model).parent / "cache")
        args.steps = 2
    rows = rows_for(args)
    quants = sorted({r["quant"] for r in rows} - {"fp32"})
    if args.quick:  # the parent has imported transformers already: spare a process
        prepare(args.model, args.cache, quants)
    else:
        run_child(["--prepare", ",".join(quants), "--model", args.model, *cache_args(args)])
    print(
        f"{'agent':<14} {'base MiB':>8} {'floor':>6} {'loaded anon/file':>17} "
        f"{'peak anon/file':>15} {'peak':>6} {'x fp32':>6} {'step s':>7} {'x fp32':>6} "
        f"{'load s':>6}"
    )
    ref: dict[str, Any] | None = None
    for row in rows:
        label = f"{row['method']} {row['quant']}" + ("+ckpt" if row["ckpt"] else "")
        try:
            r = json.loads(run_child(["--one", json.dumps(row)]))
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1:] or ["?"]
            print(f"{label:<14} failed: {last[0][:100]}")
            continue
        ref = ref or r
        floor = (r["floor_anon"] + r["floor_file"]) / MiB
        print(
            f"{label:<14} {r['base_bytes'] / MiB:>8.1f} {floor:>6.0f} "
            f"{r['loaded_anon'] / MiB:>8.0f}/{r['loaded_file'] / MiB:<8.0f} "
            f"{r['peak_anon'] / MiB:>7.0f}/{r['peak_file'] / MiB:<7.0f} {r['peak'] / MiB:>6.0f} "
            f"{r['peak'] / ref['peak']:>6.3f} {r['step_s']:>7.2f} "
            f"{r['step_s'] / ref['step_s']:>6.3f} {r['load_s']:>6.1f}",
            flush=True,
        )
    return 0


def cache_args(args: argparse.Namespace) -> list[str]:
    return ["--cache", args.cache] if args.cache else []


if __name__ == "__main__":
    sys.exit(main())
