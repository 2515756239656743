"""A stand-in bigbench archive for ``scoreboard.py --quick`` where the real one is not cached:
four Natural-Instructions-shaped subtasks made of the demo task families, read by the same
``tarfile`` reader, so CI runs the whole path without a 358 MB download."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions"
TASKS = {20: "addition", 33: "reverse", 22: "capital", 39: "uppercase"}


def stand_in_archive(path: Path, per_task: int = 40) -> Path:
    from aggregator.local.demo_data import INSTRUCTIONS, make_examples

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with tarfile.open(path, "w:gz") as tar:
        for number, family in TASKS.items():
            records = make_examples(family, per_task, rng)
            task = {
                "name": f"demo_{family}",
                "task_prefix": f"Definition: {INSTRUCTIONS[family]}",
                "examples": [{"input": r["input"], "target": [r["output"]]} for r in records],
            }
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"{ROOT}/subtask{number:03d}_demo_{family}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path
