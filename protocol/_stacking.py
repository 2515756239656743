"""Stacking of per-layer tensors into one safetensors entry, to keep payload headers small.

A LoRA update of a 30-layer model is 240 small tensors; written one entry each, the
safetensors header alone (about 125 bytes of JSON per entry) costs ~0.8% of a 3.7 MB payload.
Tensors whose names differ only in their first integer component (the layer index) and that
share dtype and shape are therefore written as one stacked entry::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight    [8, 576]
    ...                                                                          -> one entry
    base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight   [8, 576]

    base_model.model.model.layers.*.self_attn.q_proj.lora_A.weight    [30, 8, 576]

with the metadata key ``edgefed.stacked`` = ``{"<entry>": "0-29", ...}`` listing the indices
in stack order (comma-separated integers and ``a-b`` ranges). When two groups share a template
(say different ranks in different layers), later entries get a suffix ``@1``, ``@2``, ... Names
that contain ``*`` or ``@`` are never stacked. Any safetensors reader still sees readable
names; :func:`unstack` restores the original names as views of the stacked tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch

from protocol.errors import PayloadError

STACKED_KEY = "edgefed.stacked"
_INDEX_TOKEN = re.compile(r"(?:^|(?<=\.))(0|[1-9][0-9]{0,8})(?=\.|$)")
_SUFFIX = re.compile(r"@[1-9][0-9]{0,5}$")
_RANGE = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")


def _template(name: str) -> tuple[str, int] | None:
    if "*" in name or "@" in name:
        return None
    m = _INDEX_TOKEN.search(name)
    if m is None:
        return None
    return name[: m.start()] + "*" + name[m.end() :], int(m.group())


def format_indices(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (order kept)."""
    parts: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def parse_indices(text: str, count: int) -> list[int]:
    """Inverse of :func:`format_indices`, refusing anything but exactly ``count`` indices."""
    out: list[int] = []
    for part in text.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise PayloadError(f"stacked indices {text[:60]!r} are malformed")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo or len(out) + hi - lo + 1 > count:
            raise PayloadError(f"stacked indices {text[:60]!r} do not match {count} slices")
        out.extend(range(lo, hi + 1))
    if len(out) != count:
        raise PayloadError(f"stacked indices {text[:60]!r} do not match {count} slices")
    return out


def stack(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Stacked entries and the ``edgefed.stacked`` metadata value (None when nothing stacked)."""
    groups: dict[tuple[str, torch.dtype, tuple[int, ...]], list[tuple[int, str]]] = {}
    for name, t in tensors.items():
        tpl = _template(name)
        if tpl is not None:
            groups.setdefault((tpl[0], t.dtype, tuple(t.shape)), []).append((tpl[1], name))
    out: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    stacked: set[str] = set()
    used: dict[str, int] = {}
    for (template, _, _), members in sorted(groups.items(), key=lambda g: str(g[0])):
        if len(members) < 2:
            continue
        members.sort()
        n = used.get(template, 0)
        used[template] = n + 1
        entry = template if n == 0 else f"{template}@{n}"
        out[entry] = torch.stack([tensors[name].detach().to("cpu") for _, name in members])
        index[entry] = format_indices([i for i, _ in members])
        stacked.update(name for _, name in members)
    for name, t in tensors.items():
        if name not in stacked:
            out[name] = t
    if not index:
        return out, None
    return out, json.dumps(index, separators=(",", ":"), sort_keys=True)


def unstack(entries: Mapping[str, torch.Tensor], spec: str | None) -> dict[str, torch.Tensor]:
    """Original tensors from stacked ``entries`` and their ``edgefed.stacked`` value."""
    return unstack_origins(entries, spec)[0]


def unstack_origins(
    entries: Mapping[str, torch.Tensor], spec: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, int | None]]]:
    """:func:`unstack`, and per tensor the entry it came from: ``(entry, None)`` for an entry
    that was not stacked, ``(entry, i)`` for slice ``i`` of a stacked one."""
    if spec is None:
        return dict(entries), {name: (name, None) for name in entries}
    try:
        index = json.loads(spec)
    except (ValueError, RecursionError):
        raise PayloadError(f"{STACKED_KEY} is not valid JSON") from None
    if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
        raise PayloadError(f"{STACKED_KEY} must map entry names to index lists")
    out = {name: t for name, t in entries.items() if name not in index}
    origins: dict[str, tuple[str, int | None]] = {name: (name, None) for name in out}
    for entry, text in index.items():
        t = entries.get(entry)
        if t is None:
            raise PayloadError(f"{STACKED_KEY} names {entry!r}, which the payload lacks")
        template = _SUFFIX.sub("", entry)
        if template.count("*") != 1 or "@" in template or t.dim() < 1:
            raise PayloadError(f"stacked entry {entry!r} is malformed")
        for pos, i in enumerate(parse_indices(text, t.shape[0])):
            name = template.replace("*", str(i))
            if name in out:
                raise PayloadError(f"stacked entry {entry!r} repeats tensor {name!r}")
            out[name] = t[pos]
            origins[name] = (entry, pos)
    return out, origins
