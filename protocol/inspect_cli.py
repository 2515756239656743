"""``edgefed-inspect PATH [--all] [--json]``: what a payload, checkpoint, adapter or captured message holds.

Accepts an edgefed payload (``.safetensors`` written by :mod:`protocol.payloads`), any
safetensors file, a peft adapter directory, a checkpoint directory with ``manifest.json`` (every
file's sha256 is verified), or a captured message (``EFEDMSG1`` container). Prints tensor names,
shapes, dtypes, bytes and density, kind, method and round, and the byte accounting: raw tensor
bytes against bytes on the wire. A payload of more than :data:`SUMMARY_ROWS` tensors is
summarised (the first rows, then one line per dtype); ``--all`` lists every tensor, and
``--json`` prints the complete report as JSON. To look at a message an agent sent, inspect the
file its outbox keeps (``<state_dir>/outbox/*.efed``, an ``EFEDMSG1`` container) or a copy of it.

A path that is missing, of no known format or corrupt ends with one line on stderr,
``edgefed-inspect: <path>: <why>``, and exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from protocol._inspect import Unreadable, inspect_path
from protocol.cli_common import ToolCommand
from protocol.errors import ProtocolError

logger = logging.getLogger(__name__)

_NAME_WIDTH = 72
SUMMARY_ROWS = 12
"""More tensors than this are summarised unless ``--all`` is given."""


def _fmt_bytes(n: int) -> str:
    return f"{n:,} B"


def _fmt_density(d: float | None) -> str:
    return "-" if d is None else f"{100.0 * d:.3f}%"


def _fmt_value(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _totals_line(report: dict[str, Any]) -> str:
    pct = report["overhead_pct"]
    pct_text = "n/a" if pct is None else f"{pct:.4f}%"
    return (
        f"raw tensor bytes {_fmt_bytes(report['raw_nbytes'])}, "
        f"bytes on wire {_fmt_bytes(report['wire_nbytes'])}, "
        f"overhead {_fmt_bytes(report['overhead_nbytes'])} ({pct_text})"
    )


def _tensor_lines(report: dict[str, Any], indent: str, all_rows: bool = True) -> list[str]:
    lines: list[str] = []
    if report["format"] == "payload":
        lines.append(
            f"{indent}payload: kind {report['kind']}, method {report['method']}, "
            f"round {report['round']}"
        )
    else:
        lines.append(f"{indent}safetensors file (not an edgefed payload)")
    for key in ("lora", "masked", "seedcoef"):
        if key in report:
            details = ", ".join(f"{k} {_fmt_value(v)}" for k, v in report[key].items())
            lines.append(f"{indent}{key}: {details}")
    rows = report["tensors"]
    width = min(_NAME_WIDTH, max([len("name"), *(len(r["name"]) for r in rows)]))
    lines.append(
        f"{indent}{'name':<{width}}  {'shape':<16} {'dtype':<6} {'bytes':>14} {'density':>9}"
    )
    shown = rows if all_rows or len(rows) <= SUMMARY_ROWS else rows[: SUMMARY_ROWS // 2]
    for r in shown:
        shape = "[" + ", ".join(str(d) for d in r["shape"]) + "]"
        lines.append(
            f"{indent}{r['name']:<{width}}  {shape:<16} {r['dtype']:<6} "
            f"{r['nbytes']:>14,} {_fmt_density(r['density']):>9}"
        )
    if len(shown) < len(rows):
        lines.append(f"{indent}... {len(rows) - len(shown)} more tensors (--all lists every one)")
        by_dtype: dict[str, list[int]] = {}
        for r in rows:
            by_dtype.setdefault(r["dtype"], []).append(r["nbytes"])
        for dtype, sizes in sorted(by_dtype.items()):
            lines.append(f"{indent}{dtype}: {len(sizes)} tensors, {sum(sizes):,} B")
    lines.append(f"{indent}{len(rows)} tensors; {_totals_line(report)}")
    return lines


def render(report: dict[str, Any], all_rows: bool = False) -> str:
    """The human-readable form of an inspection report (every tensor row with ``all_rows``)."""
    fmt = report["format"]
    lines = [f"{report['path']}: {fmt}"]
    if fmt in ("payload", "safetensors"):
        lines += _tensor_lines(report, "", all_rows)
    elif fmt == "peft-adapter":
        for key, value in report["adapter"].items():
            lines.append(f"  {key}: {value}")
        lines += _tensor_lines(report["file"], "  ", all_rows)
    elif fmt == "checkpoint":
        for key, value in report["manifest"].items():
            lines.append(f"  {key}: {json.dumps(value)[:200]}")
        for f in report["files"]:
            lines.append(f"  {f['name']}: {f['nbytes']:,} B, sha256 {f['sha256']} verified")
            if "report" in f:
                lines += _tensor_lines(f["report"], "    ", all_rows)
        lines.append(f"  total: {_totals_line(report)}")
    elif fmt == "message":
        for key in ("type", "run_id", "round", "method", "msg_id"):
            if key in report:
                lines.append(f"  {key}: {report[key]}")
        lines.append(f"  frames: {report['frames']}, file {_fmt_bytes(report['file_nbytes'])}")
        for blob in report["blobs"]:
            lines.append(f"  blob {blob['name']}: {blob['nbytes']:,} B, sha256 verified")
            if blob["payload"] is None:
                lines.append("    (not safetensors)")
            else:
                lines += _tensor_lines(blob["payload"], "    ", all_rows)
        lines.append(f"  all frames: {_totals_line(report)}")
    return "\n".join(lines)


def _fail(path: Path, why: str) -> NoReturn:
    click.echo(f"edgefed-inspect: {path}: {why}", err=True)
    sys.exit(2)


@click.command(
    cls=ToolCommand,
    tool="edgefed-inspect",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("path", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--all", "all_rows", is_flag=True, help="List every tensor (default: a summary).")
@click.option("--json", "as_json", is_flag=True, help="Print the complete report as JSON.")
def main(path: Path, all_rows: bool, as_json: bool) -> None:
    """Show what PATH holds: a payload, safetensors file, peft adapter, checkpoint or message."""
    try:
        report = inspect_path(path)
    except (ProtocolError, OSError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, Unreadable):
            why = exc.strerror or why
        _fail(path, why)
    except Exception as exc:  # the CLI boundary: one line, never a traceback
        logger.debug("inspecting %s failed", path, exc_info=True)
        _fail(path, f"unexpected {type(exc).__name__}: {exc}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render(report, all_rows))


if __name__ == "__main__":  # pragma: no cover
    main()
