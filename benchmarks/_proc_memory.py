"""Peak memory of process trees, from ``/proc``: what each Flower role and each host used.

:class:`Monitor` polls, on a thread, every process under some root pids grouped by host
("server", "client00", ...): each process's ``VmHWM`` (its own peak resident set) and each
tree's summed ``VmRSS`` (the peak of the host's whole footprint). A process's role is the
Flower executable it runs (``flower-superlink`` -> ``superlink``, ``flwr-serverapp`` ->
``serverapp``, ...). Linux only.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1e6


@dataclass
class Monitor:
    """Polls the process trees under the roots: peak VmHWM per process, peak summed RSS per tree."""

    roots: dict[str, list[int]] = field(default_factory=dict)  # group -> root pids
    hwm_kb: dict[int, int] = field(default_factory=dict)
    role: dict[int, tuple[str, str]] = field(default_factory=dict)  # pid -> (group, role)
    tree_peak_kb: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, interval: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(interval)

    def poll(self) -> None:
        for group, roots in self.roots.items():
            total = 0
            for pid in process_tree(roots):
                status = status_kb(pid)
                if status is None:
                    continue
                rss, hwm = status
                total += rss
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
                if pid not in self.role:
                    self.role[pid] = (group, _role(pid))
            self.tree_peak_kb[group] = max(self.tree_peak_kb.get(group, 0), total)

    def report(self) -> dict[str, Any]:
        """Peaks in MB: the server's roles, the clients' roles (max over clients), per client."""
        per_group: dict[str, dict[str, Any]] = {}
        for pid, (group, role) in self.role.items():
            g = per_group.setdefault(group, {"processes": {}})
            g[role] = max(g.get(role, 0.0), self.hwm_kb.get(pid, 0) * 1024 / MB)
            g["processes"][role] = g["processes"].get(role, 0) + 1
        for group, g in per_group.items():
            g["tree_peak"] = self.tree_peak_kb.get(group, 0) * 1024 / MB
        clients = [g for name, g in sorted(per_group.items()) if name != "server"]
        roles = sorted({k for g in clients for k in g if k != "processes"})
        return _rounded(
            {
                "server": per_group.get("server", {}),
                "client_max": {r: max(g.get(r, 0.0) for g in clients) for r in roles},
                "client_tree_peaks": [g.get("tree_peak", 0.0) for g in clients],
                "client_processes": clients[0]["processes"] if clients else {},
            }
        )


def process_tree(roots: list[int]) -> list[int]:
    """The roots and every descendant still alive, from ``/proc/<pid>/task/*/children``."""
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB, or None for a process gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmHWM" not in fields:
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "unknown"
    for arg in argv:
        base = os.path.basename(arg.decode(errors="replace"))
        if base.startswith(("flower-", "flwr-")):
            return base.removeprefix("flower-").removeprefix("flwr-")
    return "other"  # a helper some Flower process started for a moment


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
