"""A real ``edgefed-aggregator serve`` process: JSON log lines and a scrapeable metrics port."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from protocol.logformat import JsonFormatter

SHA = "ab" * 32
DEADLINE_S = 120.0


def test_json_formatter_writes_one_object_per_record() -> None:
    record = logging.makeLogRecord(
        {"name": "aggregator", "levelname": "INFO", "msg": "round %d", "args": (3,)}
    )
    record.agent = "a1"
    body = json.loads(JsonFormatter().format(record))
    assert body["message"] == "round 3" and body["level"] == "INFO"
    assert body["logger"] == "aggregator" and body["agent"] == "a1"
    assert body["ts"].endswith("+00:00")


def test_serve_logs_json_and_serves_metrics(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(
        '[server]\nbind = "tcp://127.0.0.1:0"\nstate_dir = "state"\n'
        f'[security]\ninsecure = true\n[run]\nmodel_sha256 = "{SHA}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator", "serve", "--config", str(cfg),
         "--log-format", "json", "--metrics-port", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    port: list[int] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                port.append(int(found.group(1)))
            if "aggregator listening" in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(DEADLINE_S), "".join(lines)
        url = f"http://127.0.0.1:{port[0]}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            text = reply.read().decode()
        assert "edgefed_aggregator_agents_connected 0.0" in text
        assert "edgefed_aggregator_rounds_completed_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE_S)
        reader.join(DEADLINE_S)
        assert proc.stderr is not None
        proc.stderr.close()
    records = [json.loads(line) for line in lines if line.strip()]
    assert any("aggregator listening" in r["message"] for r in records)
    assert {"ts", "level", "logger", "message"} <= set(records[0])


def test_agent_run_log_format_json_sets_json_lines() -> None:
    from edge_agent.cli import _setup_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        _setup_logging(0, "json")
        assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
        _setup_logging(0, "text")
        assert [type(h.formatter) for h in root.handlers] == [logging.Formatter]
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
