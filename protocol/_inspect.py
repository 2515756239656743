"""Reports for ``edgefed-inspect``: what a file or directory holds, as plain JSON-ready dicts.

Recognised, in this order: a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` (a peft adapter), a directory with ``manifest.json`` (a
checkpoint: every listed file is hashed and compared), a file starting with ``EFEDMSG1`` (a
captured message), and any safetensors file (an edgefed payload when its metadata says so).
Anything else, or anything corrupt, raises :class:`Unreadable` with one line saying why.

Byte accounting of every tensor report: ``raw_nbytes`` is tensor data, ``wire_nbytes`` the
file or blob size, ``overhead_nbytes`` their difference and ``overhead_pct`` its share of raw.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

from protocol._payload_checks import lora_rank_of
from protocol._safetensors_io import DTYPE_CODES, ITEMSIZE, parse_header
from protocol.errors import PayloadError, ProtocolError
from protocol.payloads import Payload, PayloadKind, decode

MESSAGE_MAGIC = b"EFEDMSG1"
SIGNATURE = b"EFED/1"
MAX_FILE_HEADER = 100 * 1024 * 1024
"""Header cap for local files (safetensors' own); payloads on the wire use a far lower one."""
MAX_JSON = 1024 * 1024
"""Cap on a message header frame, ``adapter_config.json`` and ``manifest.json``."""
_PEFT_FIELDS = (
    "peft_type",
    "base_model_name_or_path",
    "task_type",
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "use_rslora",
)


class Unreadable(ProtocolError):
    """The path is missing, of no known format, or corrupt."""


def _totals(raw: int, wire: int) -> dict[str, Any]:
    overhead = wire - raw
    pct = round(100.0 * overhead / raw, 4) if raw else None
    return {
        "raw_nbytes": raw,
        "wire_nbytes": wire,
        "overhead_nbytes": overhead,
        "overhead_pct": pct,
    }


def _row(name: str, shape: Any, dtype: str, nbytes: int, density: float | None = None) -> dict:
    return {
        "name": name,
        "shape": list(shape),
        "dtype": dtype,
        "nbytes": nbytes,
        "density": density,
    }


def _lora_summary(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    ranks = {
        name.removesuffix(".lora_A.weight"): shape[0]
        for name, shape in shapes.items()
        if name.endswith(".lora_A.weight") and shape
    }
    if not ranks:
        return None
    return {"modules": len(ranks), "ranks": sorted(set(ranks.values()))}


def payload_report(payload: Payload) -> dict[str, Any]:
    """Rows and totals of a decoded payload."""
    t = payload.tensors
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if payload.kind is PayloadKind.MASKED:
        for name, shape in payload.shapes.items():
            v = t[name]
            density = v.numel() / math.prod(shape) if math.prod(shape) else None
            rows.append(_row(name, shape, DTYPE_CODES[v.dtype], v.nbytes, density))
        extra["masked"] = {"seed": payload.seed, "density": payload.density}
    elif payload.kind is PayloadKind.SPARSE:
        for name, shape in payload.shapes.items():
            i, v = t[f"{name}.indices"], t[f"{name}.values"]
            density = v.numel() / math.prod(shape) if math.prod(shape) else None
            rows.append(_row(name, shape, DTYPE_CODES[v.dtype], i.nbytes + v.nbytes, density))
    else:
        for name, tensor in t.items():
            rows.append(_row(name, tensor.shape, DTYPE_CODES[tensor.dtype], tensor.nbytes))
    if payload.kind is PayloadKind.SEEDCOEF:
        triples = t["value"].numel()
        k, n_groups = payload.k or 0, payload.n_groups or 0
        extra["seedcoef"] = {
            "base_seed": payload.base_seed,
            "k": k,
            "n_groups": n_groups,
            "triples": triples,
            "density": triples / (k * n_groups) if k * n_groups else None,
        }
    if payload.kind is PayloadKind.LORA:
        ranks = lora_rank_of(t)
        extra["lora"] = {"modules": len(ranks), "ranks": sorted(set(ranks.values()))}
    return {
        "format": "payload",
        "kind": payload.kind.value,
        "method": payload.method,
        "round": payload.round,
        "metadata": payload.meta,
        **extra,
        "tensors": rows,
        "header_nbytes": payload.header_nbytes,
        **_totals(payload.raw_nbytes, payload.wire_nbytes),
    }


def _decoded_report(data: bytes | memoryview) -> dict[str, Any]:
    try:
        return payload_report(decode(data, max_header=MAX_FILE_HEADER))
    except PayloadError as exc:
        raise Unreadable(f"edgefed payload rejected: {exc}") from None


def bytes_report(data: bytes | memoryview) -> dict[str, Any]:
    """Report of safetensors bytes: decoded as a payload when its metadata says it is one.

    Raises :class:`PayloadError` when ``data`` is not safetensors, :class:`Unreadable` when it
    is a payload that does not pass :func:`protocol.payloads.decode`.
    """
    header = parse_header(data, max_header=MAX_FILE_HEADER, dtypes=ITEMSIZE)
    if "edgefed.kind" in header.metadata:
        return _decoded_report(data)
    return _plain_report(header.raw, header.metadata, header.header_nbytes, header.total_nbytes)


def _plain_report(
    raw: dict[str, Any], metadata: dict[str, str], header_nbytes: int, total: int
) -> dict[str, Any]:
    rows = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        rows.append(_row(name, info["shape"], info["dtype"], end - begin))
        shapes[name] = tuple(info["shape"])
    report: dict[str, Any] = {"format": "safetensors", "metadata": metadata}
    lora = _lora_summary(shapes)
    if lora is not None:
        report["lora"] = lora
    return {
        **report,
        "tensors": rows,
        "header_nbytes": header_nbytes,
        **_totals(total - header_nbytes, total),
    }


def safetensors_file_report(path: Path) -> dict[str, Any]:
    """Report of a safetensors file, reading only its header unless it is a payload."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) == 8:
            (n,) = struct.unpack("<Q", prefix)
            prefix += fh.read(min(n, MAX_FILE_HEADER))
    header = parse_header(prefix, max_header=MAX_FILE_HEADER, total_nbytes=size, dtypes=ITEMSIZE)
    if "edgefed.kind" in header.metadata:
        return _decoded_report(path.read_bytes())
    return _plain_report(header.raw, header.metadata, header.header_nbytes, size)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


def _read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON:
        raise Unreadable(f"{path.name} is larger than {MAX_JSON} bytes")
    try:
        return _strict_json(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"{path.name} is not valid JSON: {exc}") from None


def adapter_report(path: Path) -> dict[str, Any]:
    config = _read_json(path / "adapter_config.json")
    if not isinstance(config, dict):
        raise Unreadable("adapter_config.json is not a JSON object")
    report = safetensors_file_report(path / "adapter_model.safetensors")
    adapter = {key: config[key] for key in _PEFT_FIELDS if key in config}
    return {"format": "peft-adapter", "adapter": adapter, "file": report}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_files(manifest: Any) -> list[tuple[str, str]]:
    """(relative path, sha256) of each file a manifest lists: ``files`` as a list of objects
    with ``path``/``name``/``file`` and ``sha256``, or as a mapping name -> sha256 or object."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    items: list[tuple[Any, Any]] = []
    if isinstance(files, dict):
        items = list(files.items())
    elif isinstance(files, list):
        for f in files:
            keys = ("path", "name", "file")
            name = next((f[k] for k in keys if k in f), None) if isinstance(f, dict) else None
            items.append((name, f))
    else:
        raise Unreadable("manifest.json has no 'files' list or mapping")
    out = []
    for name, info in items:
        digest = info.get("sha256") if isinstance(info, dict) else info
        if not isinstance(name, str) or not isinstance(digest, str):
            raise Unreadable(f"manifest.json: entry {str(name)[:60]!r} lacks a name or sha256")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise Unreadable(f"manifest.json: {name[:60]!r} points outside the checkpoint")
        out.append((name, digest.lower()))
    return out


def checkpoint_report(path: Path) -> dict[str, Any]:
    manifest = _read_json(path / "manifest.json")
    files = []
    raw = wire = 0
    for name, digest in _manifest_files(manifest):
        file = path / name
        if not file.is_file():
            raise Unreadable(f"{name}: listed in manifest.json but missing")
        actual = _sha256(file)
        if actual != digest:
            raise Unreadable(f"{name}: sha256 {actual[:16]}... differs from the manifest's")
        entry: dict[str, Any] = {"name": name, "nbytes": file.stat().st_size, "sha256": actual}
        if file.suffix == ".safetensors":
            entry["report"] = safetensors_file_report(file)
            raw += entry["report"]["raw_nbytes"]
            wire += entry["report"]["wire_nbytes"]
        files.append(entry)
    info = {k: v for k, v in manifest.items() if k != "files"}
    return {"format": "checkpoint", "manifest": info, "files": files, **_totals(raw, wire)}


def _frames(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    frames: list[memoryview] = []
    pos = len(MESSAGE_MAGIC)
    while pos < len(view):
        if pos + 8 > len(view):
            raise Unreadable(f"truncated frame length at byte {pos}")
        (length,) = struct.unpack_from("<Q", view, pos)
        pos += 8
        if length > len(view) - pos:
            raise Unreadable(f"frame {len(frames)} of {length} bytes runs past the end")
        frames.append(view[pos : pos + length])
        pos += length
    return frames


def message_report(data: bytes) -> dict[str, Any]:
    frames = _frames(data)
    if len(frames) < 2 or bytes(frames[0]) != SIGNATURE:
        raise Unreadable(f"message does not start with the signature {SIGNATURE!r} and a header")
    if frames[1].nbytes > MAX_JSON:
        raise Unreadable(f"message header of {frames[1].nbytes} bytes is too large")
    try:
        header = _strict_json(bytes(frames[1]))
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"message header is not valid JSON: {exc}") from None
    refs = header.get("blobs", []) if isinstance(header, dict) else None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise Unreadable("message header is not an object with a 'blobs' list")
    if len(refs) != len(frames) - 2:
        raise Unreadable(f"header lists {len(refs)} blobs, the message has {len(frames) - 2}")
    blobs = []
    raw = 0
    for ref, frame in zip(refs, frames[2:], strict=True):
        name = str(ref.get("name", ""))[:256]
        if ref.get("nbytes") != frame.nbytes:
            raise Unreadable(
                f"blob {name!r}: {frame.nbytes} bytes, header says {ref.get('nbytes')}"
            )
        if ref.get("sha256") != hashlib.sha256(frame).hexdigest():
            raise Unreadable(f"blob {name!r}: sha256 differs from the header's")
        blob: dict[str, Any] = {"name": name, "nbytes": frame.nbytes, "sha256": ref["sha256"]}
        try:
            blob["payload"] = bytes_report(frame)
            raw += blob["payload"]["raw_nbytes"]
        except PayloadError:
            blob["payload"] = None  # not safetensors: an opaque blob
        except Unreadable as exc:
            raise Unreadable(f"blob {name!r}: {exc}") from None
        blobs.append(blob)
    fields = {k: header[k] for k in ("type", "run_id", "round", "method", "msg_id") if k in header}
    return {
        "format": "message",
        **fields,
        "header": header,
        "frames": len(frames),
        "blobs": blobs,
        "file_nbytes": len(data),
        **_totals(raw, sum(f.nbytes for f in frames)),
    }


def inspect_path(path: Path) -> dict[str, Any]:
    """Report of whatever ``path`` holds; :class:`Unreadable` (or another ProtocolError) if
    it is none of the known formats or corrupt."""
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            if not (path / "adapter_model.safetensors").is_file():
                raise Unreadable("peft adapter without adapter_model.safetensors")
            report = adapter_report(path)
        elif (path / "manifest.json").is_file():
            report = checkpoint_report(path)
        else:
            raise Unreadable("directory is neither a peft adapter nor a checkpoint")
    elif path.is_file():
        with path.open("rb") as fh:
            start = fh.read(len(MESSAGE_MAGIC) + 1)
        if start.startswith(MESSAGE_MAGIC):
            report = message_report(path.read_bytes())
        else:
            try:
                report = safetensors_file_report(path)
            except PayloadError as exc:
                if start[8:9] == b"{":  # a JSON header follows the length: safetensors, broken
                    raise Unreadable(f"corrupt safetensors file: {exc}") from None
                raise Unreadable(f"not a safetensors file, payload or message ({exc})") from None
    else:
        raise Unreadable("no such file or directory")
    return {"path": str(path), **report}
